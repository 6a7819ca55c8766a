"""Self-discovery, part 2: visual-word coordinates and the cubes cropped at them.

For each visual-word class c (docs/REFERENCE.md section 4, Self-discovery and pretraining):
1. a reference patient is drawn, without replacement, from the training patients;
2. the training patients are ranked by L2 distance of their embeddings to the reference's
   (the reference itself comes first) and the top N kept; the validation patients are
   ranked the same way and the top M kept;
3. one coordinate is drawn in the reference: the cube lies inside the borders (start in
   [border, size - border - cube - 1] per axis, and `AIR_DEPTH` slices fewer in depth so
   the air filter can look below the cube, as in the original generators), is at least
   `min_distance` voxels (Euclidean, between cube starts) from the coordinates of the
   earlier classes, and passes the air filter of TransVW / Models Genesis (`air_scores`:
   each voxel scores 1, 1/2 or 0 as tissue, at or above `air_threshold` = -150 HU, is
   first met in its own slice, the next one, or neither of the next `AIR_DEPTH` - 1 slices
   down its column; the cube is rejected when the mean score is above `max_air_score`,
   the originals' lung_max = 0.15, so kept cubes are mostly lung or air). Up to
   `max_tries` candidates are drawn at once and tested together (array operations, no
   per-voxel loop); the first that passes wins. When none passes, the reference is
   dropped and the next one drawn, as TransVW's generator does (`Plan.redrawn`).
4. at that same coordinate a cube is cropped in each of the N + M patients (clamped to the
   patient's volume when it is smaller than the reference's), and for training instances
   `extra_resolutions` more crops with a random in-plane size in `extra_size`, whose corner
   is the cube's corner shifted in-plane by a random offset in `extra_offset` (the original
   anchors them there, not at the centre), resized to the cube shape (the released data's
   resolutions 2 and 3; validation has resolution 1 only, like the released `val_data1_*`
   files).

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
from transvw_jax.errors import ConfigError, DataError
from transvw_jax.progress import Progress

TRAIN, VALIDATION = "train", "validation"
# The originals' len_depth: the air filter looks at each voxel and the slices below it, up to
# AIR_DEPTH - 1 of them, so a candidate cube needs AIR_DEPTH more slices of room in depth.
AIR_DEPTH = 3
# Models Genesis gives up on a patient after this many tries per wanted cube (50 x scale).
TRIES_PER_RANDOM_CUBE = 50


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
    offset: tuple[int, int]  # in-plane shift of the crop corner from the cube's (resolution > 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    references: np.ndarray  # (classes,) patient index of each class's reference
    coordinates: np.ndarray  # (classes, 3) cube start in the reference
    neighbours: dict[str, np.ndarray]  # split -> (classes, instances) patient indices, nearest first
    crops: list[Crop]
    redrawn: np.ndarray  # patients drawn as a reference and dropped (no coordinate passed), draw order


def air_scores(volume: np.ndarray, starts: np.ndarray, cube: Sequence[int], threshold: float) -> np.ndarray:
    """The TransVW / Models Genesis air score of the cubes at `starts` (K, 3), in [0, 1].

    Voxel (i, j, d) of a cube scores 1 - k / (AIR_DEPTH - 1), where k is the first of the
    slices d, d + 1, ..., d + AIR_DEPTH - 1 (of the volume, so the last voxels look below the
    cube) whose value is at or above `threshold` (-150 HU on the normalised scale), and 0
    when none is; the score of a cube is the mean over its voxels. All tissue scores 1, lung
    or outside air 0. Slices past the end of the volume count as air (only a volume too
    shallow for the originals, which would skip it, gets there).

    The scores are exact: weights are integers and the total is divided once.
    """
    cx, cy, cz = (int(c) for c in cube)
    starts = np.asarray(starts, int).reshape(-1, 3)
    depth = cz + AIR_DEPTH - 1  # the slices the filter looks at (the originals read one more, unused)
    missing = int(starts[:, 2].max(initial=0)) + depth - volume.shape[2]
    if missing > 0:
        volume = np.pad(np.asarray(volume, np.float32), ((0, 0), (0, 0), (0, missing)),
                        constant_values=-np.inf)
    # Windows first, threshold second: thresholding the whole volume would cost a full pass per call.
    view = np.lib.stride_tricks.sliding_window_view(volume, (cx, cy, depth))
    tissue = view[starts[:, 0], starts[:, 1], starts[:, 2]] >= threshold  # (K, cx, cy, depth)
    weight = np.zeros((len(starts), cx, cy, cz), np.int8)
    seen = np.zeros((len(starts), cx, cy, cz), bool)
    for k in range(AIR_DEPTH - 1):  # tissue first met at k = AIR_DEPTH - 1 scores 0, like none
        first = tissue[..., k:k + cz] & ~seen
        weight += first.astype(np.int8) * np.int8(AIR_DEPTH - 1 - k)
        seen |= first
    return weight.sum(axis=(1, 2, 3), dtype=np.int64) / ((AIR_DEPTH - 1) * cx * cy * cz)


def coordinate_range(shape: Sequence[int], cube: Sequence[int],
                     border: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Inclusive [low, high] of cube starts, as the originals draw them; centred if the volume is too small.

    high = size - cube - 1 - border per axis, and AIR_DEPTH slices less in depth so the air
    filter's look below the cube stays inside the volume and the border.
    """
    shape, cube, border = (np.asarray(v, int) for v in (shape, cube, border))
    below = np.array([0, 0, AIR_DEPTH])
    low, high = border, shape - cube - below - 1 - border
    tight = high < low
    centre = np.maximum((shape - cube - below) // 2, 0)
    return np.where(tight, centre, low), np.where(tight, centre, high), tight


def passes_air_filter(volume: np.ndarray, starts: np.ndarray, cube: Sequence[int],
                      cfg: ml_collections.ConfigDict) -> np.ndarray:
    """(K,) bool: the originals keep a cube unless its mean air score is above lung_max."""
    return air_scores(volume, starts, cube, cfg.air_threshold) <= cfg.max_air_score


def choose_coordinate(volume: np.ndarray, cube: Sequence[int], cfg: ml_collections.ConfigDict,
                      previous: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A cube start in `volume` per the rules above, or None when none of `max_tries` passes.

    None makes the caller draw another reference, as TransVW's generator does after its
    200 tries; keeping the least-air candidate instead would admit cubes the paper rejects.
    """
    low, high, _ = coordinate_range(volume.shape, cube, cfg.border)
    starts = rng.integers(low, high + 1, size=(cfg.max_tries, 3))
    if len(previous):
        dist = np.sqrt(((starts[:, None, :] - previous[None, :, :]) ** 2).sum(-1)).min(axis=1)
        far = dist >= cfg.min_distance
    else:
        far = np.ones(len(starts), bool)
    chunk = 25  # test candidates in groups: most classes stop in the first group
    for begin in range(0, len(starts), chunk):
        sel = np.arange(begin, min(begin + chunk, len(starts)))
        sel = sel[far[sel]]  # a candidate too near an earlier class is rejected before the air test
        if not len(sel):
            continue
        ok = passes_air_filter(volume, starts[sel], cube, cfg)
        if ok.any():
            return starts[sel[np.argmax(ok)]]
    return None


def random_starts(volume: np.ndarray, cube: Sequence[int], cfg: ml_collections.ConfigDict,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, 3) Models Genesis cube starts in `volume`, n <= `random_cubes_per_patient`.

    Like infinite_generator_3D: candidates are tried one after another (here in vectorised
    groups, kept in draw order) and those passing the air filter kept until the wanted count
    is reached or TRIES_PER_RANDOM_CUBE x that count have been tried; the patient then
    gives what it has, possibly nothing.
    """
    want = int(cfg.random_cubes_per_patient)
    budget = TRIES_PER_RANDOM_CUBE * want
    low, high, _ = coordinate_range(volume.shape, cube, cfg.border)
    kept: list[np.ndarray] = []
    tried = found = 0
    chunk = 64  # candidates scored per group: bounded memory, few passes for a typical lung CT
    while tried < budget and found < want:
        starts = rng.integers(low, high + 1, size=(min(chunk, budget - tried), 3))
        passed = starts[passes_air_filter(volume, starts, cube, cfg)][:want - found]
        kept.append(passed)
        found += len(passed)
        tried += len(starts)
    return np.concatenate(kept) if kept else np.zeros((0, 3), int)


def rank_neighbours(embeddings: np.ndarray, reference: int, candidates: np.ndarray, count: int) -> np.ndarray:
    """The `count` candidates nearest (L2) to the reference's embedding, nearest first (stable)."""
    d = np.linalg.norm(embeddings[candidates] - embeddings[reference], axis=1)
    return candidates[np.argsort(d, kind="stable")[:count]]


def check_class_count(num_classes: int, splits: Sequence[str]) -> None:
    """ConfigError unless every class can have its own training patient as reference. Known
    once the patients are split: `discover` checks it then, before the auto-encoder trains."""
    n_train = int(np.sum(np.asarray(splits) == TRAIN))
    if num_classes > n_train:
        raise ConfigError(f"model.num_classes={num_classes} needs as many training patients (one reference "
                          f"each, without replacement); there are {n_train}")


def plan_words(embeddings: np.ndarray, splits: Sequence[str], load: Callable[[int], np.ndarray],
               num_classes: int, cube: Sequence[int], cfg: ml_collections.ConfigDict, seed: int) -> Plan:
    """References, coordinates, neighbours and every crop of every class.

    Args:
      embeddings: (P, D) one row per patient.
      splits: (P,) "train" or "validation" per patient.
      load: patient index -> normalised volume (X, Y, Z); called once per reference drawn.

    References are drawn without replacement from the training patients (one permutation,
    walked in order); a reference with no passing coordinate is dropped for good and the
    next one drawn, as in TransVW, and DataError is raised when the patients run out.
    """
    splits = np.asarray(splits)
    check_class_count(num_classes, splits)
    train = np.flatnonzero(splits == TRAIN)
    val = np.flatnonzero(splits == VALIDATION)
    n_train = min(cfg.train_instances, len(train))
    n_val = min(cfg.val_instances, len(val))
    if n_train < cfg.train_instances or n_val < cfg.val_instances:
        logging.warning("discover: %d/%d training and %d/%d validation instances per class (fewer patients "
                        "than discovery.words.*_instances)", n_train, cfg.train_instances, n_val,
                        cfg.val_instances)
    rng = np.random.default_rng([seed, 0])
    draws = rng.permutation(train)
    references = np.zeros(num_classes, int)
    redrawn: list[int] = []
    coordinates = np.zeros((num_classes, 3), int)
    neighbours = {TRAIN: np.zeros((num_classes, n_train), int),
                  VALIDATION: np.zeros((num_classes, n_val), int)}
    crops: list[Crop] = []
    progress = Progress("discover/plan", num_classes, "classes")
    for c in range(num_classes):
        start = None
        while start is None:
            if len(redrawn) + c == len(draws):
                raise DataError(_no_reference_message(c, num_classes, len(draws), cfg))
            ref = int(draws[len(redrawn) + c])
            start = choose_coordinate(load(ref), cube, cfg, coordinates[:c], rng)
            if start is None:
                redrawn.append(ref)
        references[c] = ref
        coordinates[c] = start
        neighbours[TRAIN][c] = rank_neighbours(embeddings, ref, train, n_train)
        neighbours[VALIDATION][c] = rank_neighbours(embeddings, ref, val, n_val) if n_val else []
        for split, members in neighbours.items():
            for rank, patient in enumerate(members[c]):
                crops.extend(_crops_of_instance(split, c, rank, int(patient), start, cube, cfg, seed))
        progress.update()
    progress.done()
    if redrawn:
        logging.warning("discover: %d reference patients redrawn: no coordinate passed the distance and air "
                        "tests in %d tries", len(redrawn), cfg.max_tries)
    return Plan(references=references, coordinates=coordinates, neighbours=neighbours, crops=crops,
                redrawn=np.asarray(redrawn, int))


def _no_reference_message(found: int, num_classes: int, patients: int, cfg: ml_collections.ConfigDict) -> str:
    settings = (f"discovery.words.max_air_score={cfg.max_air_score}, air_threshold={cfg.air_threshold}, "
                f"max_tries={cfg.max_tries}, border={tuple(cfg.border)}")
    if not found:
        return f"no patient has a cube that passes the air filter ({settings})"
    return (f"only {found} of model.num_classes={num_classes} classes found a reference: the other "
            f"{patients - found} training patients have no cube that passes the air filter and lies "
            f"discovery.words.min_distance={cfg.min_distance} from the earlier classes ({settings})")


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
    """Where `crop` starts in a volume of `shape`: the class's cube corner, shifted in-plane, clamped.

    TransVW's generator cuts its resolution-2/3 crops from the cube corner plus the offset
    (the crop grows away from the corner, not around the cube's centre) and draws a new
    size and offset when the crop would pass the volume's far edge; here it is clamped
    inside instead, since the plan is made without loading the neighbour volumes. With the
    paper's borders (100 voxels in-plane) neither edge is reachable and the two agree.
    `cube` is unused: the anchor is the corner, whatever the crop size.
    """
    del cube
    out = []
    for axis in range(3):
        s = crop.start[axis] + (crop.offset[axis] if axis < 2 else 0)
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
    """Models Genesis data: up to `cfg.random_cubes_per_patient` random cubes per patient, label 0.

    Cube starts come from `random_starts` (drawn inside the borders, air-filtered; a patient
    that runs out of tries gives fewer cubes, or none, as in infinite_generator_3D). Each
    patient is loaded once; draws come from a generator seeded by (seed, patient), so the
    store is the same for the same seed. Returns the cube counts per split and
    `cubes_skipped` (wanted but not found), `patients_given_up` (ran out of tries) and
    `patients_without_cubes`; DataError when no patient gives a cube.
    """
    counts = {TRAIN: 0, VALIDATION: 0, "cubes_skipped": 0, "patients_given_up": 0,
              "patients_without_cubes": 0}
    want = int(cfg.random_cubes_per_patient)
    progress = Progress("discover/random", len(paths), "patients")
    for patient, split in enumerate(splits):
        volume = load(patient)
        starts = random_starts(volume, cube, cfg, np.random.default_rng([seed, 3, patient]))
        counts["cubes_skipped"] += want - len(starts)
        counts["patients_given_up"] += len(starts) < want
        counts["patients_without_cubes"] += not len(starts)
        for start in starts:
            crop = Crop(split, 0, 0, patient, tuple(int(s) for s in start), 1,
                        tuple(int(c) for c in cube), (0, 0))
            x, begin = cut(volume, crop, cube)
            writer.add(split, x, 0, source=str(paths[patient]), coord=begin, size=crop.size, resolution=1)
            counts[split] += 1
        progress.update(extra=f"{counts[TRAIN]} + {counts[VALIDATION]} cubes")
    progress.done()
    if not counts[TRAIN] + counts[VALIDATION]:
        raise DataError(f"no patient has a cube that passes the air filter (discovery.words.max_air_score="
                        f"{cfg.max_air_score}, air_threshold={cfg.air_threshold}, border={tuple(cfg.border)};"
                        f" {TRIES_PER_RANDOM_CUBE} x random_cubes_per_patient tries per patient)")
    if counts["patients_given_up"]:
        logging.warning("discover: %d of %d patients ran out of tries (%d x %d) before %d cubes passed the "
                        "air test; %d cubes skipped, %d patients gave none", counts["patients_given_up"],
                        len(paths), TRIES_PER_RANDOM_CUBE, want, want, counts["cubes_skipped"],
                        counts["patients_without_cubes"])
    return counts
