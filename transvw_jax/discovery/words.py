"""Self-discovery, part 2: visual-word coordinates and the cubes cropped at them.

For each visual-word class c (REFERENCE.md section 4):
1. a reference patient is drawn, without replacement, from the training patients;
2. the training patients are ranked by L2 distance of their embeddings to the reference's
   (the reference itself comes first) and the top N kept; the validation patients are
   ranked the same way and the top M kept;
3. one coordinate is drawn in the reference: the cube lies inside the borders (start in
   [border, size - border - cube] per axis), is at least `min_distance` voxels (Euclidean,
   between cube starts) from the coordinates of the earlier classes, and is not mostly
   air. The air test is the Models Genesis one: per (x, y) column of the cube, the depth of
   the first voxel at or above `air_threshold` (-150 HU) divided by the cube depth (0 for
   a column that never gets there), averaged over the columns; a cube scoring above
   `max_air_score` (0.15) is rejected. Up to `max_tries` candidates are drawn at once and
   tested together (array operations, no per-voxel loop); the first that passes wins.
4. at that same coordinate a cube is cropped in each of the N + M patients (clamped to the
   patient's volume when it is smaller than the reference's), and for training instances
   `extra_resolutions` more crops with a random in-plane size in `extra_size` and an
   in-plane offset in `extra_offset`, centred on the cube and resized to the cube shape
   (the released data's resolutions 2 and 3; validation has resolution 1 only, like the
   released `val_data1_*` files).

Streaming. Planning (steps 1-3) needs the embeddings and one reference volume per class;
extraction (step 4) then visits each patient ONCE and crops every cube planned in it, so
memory holds one volume at a time and the cost is (patients loaded) + (cubes cropped),
not classes x instances volume loads. Every random draw comes from a generator seeded by
(seed, class, ...), so the same seed gives the same crops in the same store order.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from transvw_jax.data.resize import resize_linear
from transvw_jax.data.store import StoreWriter
from transvw_jax.errors import ConfigError
from transvw_jax.progress import Progress

TRAIN, VALIDATION = "train", "validation"


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.train_instances = 200  # nearest training patients per class (the reference included)
    c.val_instances = 30  # nearest validation patients per class
    c.border = (100, 100, 30)  # voxels kept free around a coordinate in the reference
    c.min_distance = 5.0  # voxels between the coordinates of two classes
    c.air_threshold = 0.425  # -150 HU on the [-1000, 1000] HU window
    c.max_air_score = 0.15
    c.max_tries = 200
    c.extra_resolutions = 2
    c.extra_size = (50, 80)  # in-plane crop size, [low, high)
    c.extra_offset = (-10, 10)  # in-plane offset of that crop, [low, high)
    c.random_cubes_per_patient = 64  # discovery.mode="random" (Models Genesis) only
    return c


@dataclasses.dataclass(frozen=True)
class Crop:
    """One cube to cut: where (in which patient, from which start) and what it becomes."""

    split: str
    label: int
    rank: int  # position of the patient in the class's neighbour ranking
    patient: int  # index into the patient list
    start: tuple[int, int, int]  # the class's coordinate (cube start in the reference)
    resolution: int  # 1 = the cube itself; 2, 3 = resized larger/smaller crops
    size: tuple[int, int, int]  # crop size before resizing
    offset: tuple[int, int]  # in-plane shift of the crop centre (resolution > 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    references: np.ndarray  # (classes,) patient index of each class's reference
    coordinates: np.ndarray  # (classes, 3) cube start in the reference
    neighbours: dict[str, np.ndarray]  # split -> (classes, instances) patient indices, nearest first
    crops: list[Crop]


def air_scores(volume: np.ndarray, starts: np.ndarray, cube: Sequence[int], threshold: float) -> np.ndarray:
    """The Models Genesis air score of the cubes at `starts` (K, 3): mean first-tissue depth."""
    cx, cy, cz = cube
    tissue = np.lib.stride_tricks.sliding_window_view(volume >= threshold, (cx, cy, cz))
    windows = tissue[starts[:, 0], starts[:, 1], starts[:, 2]]  # (K, cx, cy, cz) bool
    first = np.argmax(windows, axis=3)  # 0 where a column has no tissue, as in the reference
    return first.mean(axis=(1, 2)) / cz


def coordinate_range(shape: Sequence[int], cube: Sequence[int],
                     border: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Inclusive [low, high] of cube starts that keep the border; centred if the volume is too small."""
    shape, cube, border = (np.asarray(v, int) for v in (shape, cube, border))
    low, high = border, shape - border - cube
    tight = high < low
    centre = (shape - cube) // 2
    return np.where(tight, centre, low), np.where(tight, centre, high), tight


def choose_coordinate(volume: np.ndarray, cube: Sequence[int], cfg: ml_collections.ConfigDict,
                      previous: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """A cube start in `volume` per the rules above; returns (start, passed_all_tests).

    When no candidate passes, the candidate with the lowest air score among those far
    enough from the earlier coordinates (else among all) is used and False returned.
    """
    low, high, _ = coordinate_range(volume.shape, cube, cfg.border)
    starts = rng.integers(low, high + 1, size=(cfg.max_tries, 3))
    if len(previous):
        dist = np.sqrt(((starts[:, None, :] - previous[None, :, :]) ** 2).sum(-1)).min(axis=1)
        far = dist >= cfg.min_distance
    else:
        far = np.ones(len(starts), bool)
    scores = np.full(len(starts), np.inf)
    chunk = 25  # test candidates in groups: most classes stop in the first group
    for begin in range(0, len(starts), chunk):
        sel = np.arange(begin, min(begin + chunk, len(starts)))
        scores[sel] = air_scores(volume, starts[sel], cube, cfg.air_threshold)
        ok = far[sel] & (scores[sel] <= cfg.max_air_score)
        if ok.any():
            return starts[sel[np.argmax(ok)]], True
    pool = np.flatnonzero(far) if far.any() else np.arange(len(starts))
    return starts[pool[np.argmin(scores[pool])]], False


def rank_neighbours(embeddings: np.ndarray, reference: int, candidates: np.ndarray, count: int) -> np.ndarray:
    """The `count` candidates nearest (L2) to the reference's embedding, nearest first (stable)."""
    d = np.linalg.norm(embeddings[candidates] - embeddings[reference], axis=1)
    return candidates[np.argsort(d, kind="stable")[:count]]


def plan_words(embeddings: np.ndarray, splits: Sequence[str], load: Callable[[int], np.ndarray],
               num_classes: int, cube: Sequence[int], cfg: ml_collections.ConfigDict, seed: int) -> Plan:
    """References, coordinates, neighbours and every crop of every class.

    Args:
      embeddings: (P, D) one row per patient.
      splits: (P,) "train" or "validation" per patient.
      load: patient index -> normalised volume (X, Y, Z); called once per class.
    """
    splits = np.asarray(splits)
    train = np.flatnonzero(splits == TRAIN)
    val = np.flatnonzero(splits == VALIDATION)
    if num_classes > len(train):
        raise ConfigError(f"model.num_classes={num_classes} needs as many training patients (one reference "
                          f"each, without replacement); there are {len(train)}")
    n_train = min(cfg.train_instances, len(train))
    n_val = min(cfg.val_instances, len(val))
    if n_train < cfg.train_instances or n_val < cfg.val_instances:
        logging.warning("discover: %d/%d training and %d/%d validation instances per class (fewer patients "
                        "than discovery.words.*_instances)", n_train, cfg.train_instances, n_val,
                        cfg.val_instances)
    rng = np.random.default_rng([seed, 0])
    references = rng.choice(train, size=num_classes, replace=False)
    coordinates = np.zeros((num_classes, 3), int)
    neighbours = {TRAIN: np.zeros((num_classes, n_train), int),
                  VALIDATION: np.zeros((num_classes, n_val), int)}
    crops: list[Crop] = []
    fallbacks = 0
    progress = Progress("discover/plan", num_classes, "classes")
    for c, ref in enumerate(references):
        start, passed = choose_coordinate(load(int(ref)), cube, cfg, coordinates[:c], rng)
        fallbacks += not passed
        coordinates[c] = start
        neighbours[TRAIN][c] = rank_neighbours(embeddings, ref, train, n_train)
        neighbours[VALIDATION][c] = rank_neighbours(embeddings, ref, val, n_val) if n_val else []
        for split, members in neighbours.items():
            for rank, patient in enumerate(members[c]):
                crops.extend(_crops_of_instance(split, c, rank, int(patient), start, cube, cfg, seed))
        progress.update()
    progress.done()
    if fallbacks:
        logging.warning("discover: %d of %d classes found no coordinate passing the distance and air "
                        "tests in %d tries; the least-air candidate was used", fallbacks, num_classes,
                        cfg.max_tries)
    return Plan(references=references, coordinates=coordinates, neighbours=neighbours, crops=crops)


def _crops_of_instance(split: str, label: int, rank: int, patient: int, start: np.ndarray,
                       cube: Sequence[int], cfg: ml_collections.ConfigDict, seed: int) -> list[Crop]:
    start = tuple(int(s) for s in start)
    crops = [Crop(split, label, rank, patient, start, 1, tuple(int(c) for c in cube), (0, 0))]
    if split != TRAIN:
        return crops
    rng = np.random.default_rng([seed, 1, label, rank])
    for r in range(cfg.extra_resolutions):
        size = int(rng.integers(cfg.extra_size[0], cfg.extra_size[1]))
        offset = tuple(int(o) for o in rng.integers(cfg.extra_offset[0], cfg.extra_offset[1], size=2))
        crops.append(Crop(split, label, rank, patient, start, 2 + r, (size, size, int(cube[2])), offset))
    return crops


def crop_box(crop: Crop, cube: Sequence[int], shape: Sequence[int]) -> tuple[int, int, int]:
    """Where `crop` starts in a volume of `shape`: centred on the class's cube, shifted, clamped."""
    out = []
    for axis in range(3):
        s = crop.start[axis] + (cube[axis] - crop.size[axis]) // 2
        if axis < 2:
            s += crop.offset[axis]
        out.append(int(np.clip(s, 0, max(0, shape[axis] - crop.size[axis]))))
    return tuple(out)


def cut(volume: np.ndarray, crop: Crop, cube: Sequence[int]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The crop's cube (resized to `cube`), and where it started in `volume`."""
    begin = crop_box(crop, cube, volume.shape)
    region = volume[tuple(slice(b, b + s) for b, s in zip(begin, crop.size, strict=True))]
    if region.shape != tuple(crop.size):  # a volume smaller than the crop: pad with its edge
        pad = [(0, s - r) for s, r in zip(crop.size, region.shape, strict=True)]
        region = np.pad(region, pad, mode="edge")
    if tuple(crop.size) != tuple(cube):
        region = resize_linear(region, cube)
    return np.asarray(region, np.float32), begin


def extract(plan: Plan, paths: Sequence[Path], load: Callable[[int], np.ndarray], writer: StoreWriter,
            cube: Sequence[int]) -> dict[str, int]:
    """Visit each patient once, in order, and write every planned cube of it; returns counts."""
    by_patient: dict[int, list[Crop]] = {}
    for crop in plan.crops:
        by_patient.setdefault(crop.patient, []).append(crop)
    counts = {TRAIN: 0, VALIDATION: 0}
    progress = Progress("discover/extract", len(by_patient), "patients")
    for patient in sorted(by_patient):
        volume = load(patient)
        order = sorted(by_patient[patient], key=lambda k: (k.split != TRAIN, k.label, k.rank, k.resolution))
        for crop in order:
            x, begin = cut(volume, crop, cube)
            writer.add(crop.split, x, crop.label, source=str(paths[patient]), coord=begin, size=crop.size,
                       resolution=crop.resolution)
            counts[crop.split] += 1
        progress.update(extra=f"{counts[TRAIN]} + {counts[VALIDATION]} cubes")
    progress.done()
    return counts


def extract_random(paths: Sequence[Path], splits: Sequence[str], load: Callable[[int], np.ndarray],
                   writer: StoreWriter, cube: Sequence[int], cfg: ml_collections.ConfigDict,
                   seed: int) -> dict[str, int]:
    """Models Genesis data: `cfg.random_cubes_per_patient` random cubes per patient, label 0.

    Each cube start is drawn inside the borders and must pass the air test (the same
    vectorised candidate search as a visual-word coordinate, without the distance rule); a
    patient with no passing candidate in `max_tries` gives its least-air candidates. Each
    patient is loaded once; draws come from a generator seeded by (seed, patient), so the
    store is the same for the same seed.
    """
    counts = {TRAIN: 0, VALIDATION: 0}
    fallbacks = 0
    progress = Progress("discover/random", len(paths), "patients")
    for patient, split in enumerate(splits):
        volume = load(patient)
        rng = np.random.default_rng([seed, 3, patient])
        for _ in range(cfg.random_cubes_per_patient):
            start, passed = choose_coordinate(volume, cube, cfg, np.zeros((0, 3), int), rng)
            fallbacks += not passed
            crop = Crop(split, 0, 0, patient, tuple(int(s) for s in start), 1,
                        tuple(int(c) for c in cube), (0, 0))
            x, begin = cut(volume, crop, cube)
            writer.add(split, x, 0, source=str(paths[patient]), coord=begin, size=crop.size, resolution=1)
            counts[split] += 1
        progress.update(extra=f"{counts[TRAIN]} + {counts[VALIDATION]} cubes")
    progress.done()
    if fallbacks:
        logging.warning("discover: %d random cubes found no candidate passing the air test in %d tries",
                        fallbacks, cfg.max_tries)
    return counts
