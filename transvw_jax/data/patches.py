"""Random-access fine-tuning sources: segmentation patches and classification cubes.

Whole CT volumes do not fit in memory by the hundred, and decoding a .nii.gz per patch
would starve the accelerator, so each labeled case is decoded once into a cache
(`<cache>/<case>.image.npy` uint16-encoded like the visual-word store, `.label.npy` uint8,
`.fg.npy` a sample of foreground coordinates) and patches are cut from memory-mapped arrays.
A cache entry records its source files' sizes and modification times and is rebuilt when
they change. Every file is written atomically.

`PatchSource[i]` is a pure function of (seed, i): case `i % n`, foreground-centred with
probability `foreground_fraction`, otherwise uniformly placed. So the Grain pipeline can
shuffle and resume it exactly like the visual-word store, and a validation source with a
fixed seed is the same patches every evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transvw_jax.data import labeled, store, volumes
from transvw_jax.errors import DataError
from transvw_jax.fileio import atomic_write, atomic_write_json
from transvw_jax.progress import Progress

MAX_FOREGROUND_SAMPLES = 50_000  # foreground coordinates kept per case (uniform subsample)


@dataclasses.dataclass(frozen=True)
class CachedCase:
    name: str
    image: Path  # uint16 (X, Y, Z)
    label: Path  # uint8 (X, Y, Z)
    foreground: Path  # int32 (N, 3)


def _stamp(*paths: Path) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array), suffix=".tmp.npy")


def cache_cases(
    cases: Sequence[labeled.Case],
    num_classes: int,
    directory: str | os.PathLike,
    normalization: str = "ct",
    orientation: str = "ras",
) -> list[CachedCase]:
    """Decode, check and cache `cases` (see the module docstring); reuse valid entries.

    The entry records `normalization` and `orientation` too: changing either rebuilds it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    progress = Progress("cache cases", len(cases), "cases")
    for case in cases:
        entry = CachedCase(
            case.name,
            directory / f"{case.name}.image.npy",
            directory / f"{case.name}.label.npy",
            directory / f"{case.name}.fg.npy",
        )
        meta_path = directory / f"{case.name}.json"
        meta = {
            "source": _stamp(case.image, case.label),
            "normalization": normalization,
            "orientation": orientation,
            "num_classes": num_classes,
        }
        fresh = meta_path.is_file() and all(p.is_file() for p in (entry.image, entry.label, entry.foreground))
        if not (fresh and json.loads(meta_path.read_text()) == meta):
            image, label = labeled.load_case(case, num_classes, normalization, orientation)
            fg = np.argwhere(label > 0).astype(np.int32)
            if len(fg) > MAX_FOREGROUND_SAMPLES:
                keep = np.random.default_rng(0).choice(len(fg), MAX_FOREGROUND_SAMPLES, replace=False)
                fg = fg[np.sort(keep)]
            _save_npy(entry.image, store.encode_cubes(image, "uint16"))
            _save_npy(entry.label, label.astype(np.uint8))
            _save_npy(entry.foreground, fg)
            atomic_write_json(meta_path, meta)
        out.append(entry)
        progress.update()
    return out


def _crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill) -> np.ndarray:
    """array[start:start+size], filled with `fill` (or edge values for fill=None) outside."""
    lo = [max(0, s) for s in start]
    hi = [min(n, s + p) for n, s, p in zip(array.shape, start, size, strict=True)]
    inner = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
    pad = [(a - s, s + p - b) for s, p, a, b in zip(start, size, lo, hi, strict=True)]
    if not any(a or b for a, b in pad):
        return inner
    if fill is None:
        return np.pad(inner, pad, mode="edge")
    return np.pad(inner, pad, constant_values=fill)


class PatchSource:
    """`length` (image, label) patches cut from cached cases: {"cube": uint16, "label": uint8}."""

    def __init__(
        self,
        cases: Sequence[CachedCase],
        patch: Sequence[int],
        length: int,
        foreground_fraction: float,
        seed: int,
    ):
        if not cases:
            raise DataError("no cases to cut patches from")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.length = int(length)
        self.foreground_fraction = float(foreground_fraction)
        self.seed = int(seed)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def _open(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if c not in self._arrays:  # a benign race between reader threads: both open the same maps
            e = self.cases[c]
            self._arrays[c] = (
                np.load(e.image, mmap_mode="r"),
                np.load(e.label, mmap_mode="r"),
                np.load(e.foreground),
            )
        return self._arrays[c]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label, fg = self._open(index % len(self.cases))
        rng = np.random.default_rng([self.seed, index])
        shape, size = np.array(image.shape), np.array(self.patch)
        if len(fg) and rng.random() < self.foreground_fraction:
            start = fg[rng.integers(len(fg))] - size // 2
            start = np.clip(start, 0, np.maximum(shape - size, 0))
        else:
            start = np.array([rng.integers(0, max(n - p, 0) + 1) for n, p in zip(shape, size, strict=True)])
        return {"cube": _crop(image, start, size, None), "label": _crop(label, start, size, 0)}


class CandidateSource:
    """Cubes centred on classification candidates: {"cube": uint16, "label": int32}.

    The cubes are cut once (one volume load per volume) into `<cache>/<hash>.cubes.npy`, the
    hash covering the candidate list, cube size, normalisation, orientation and the volumes'
    sizes and modification times. Centres index the array as `volumes.load_volume` returns it
    in `orientation`: with "ras" (reoriented to RAS+) not the file's own voxel order, so for
    LPS files (.mhd, many DICOM conversions) convert world or file-voxel coordinates first;
    with "reference" the stored voxel order, transposed to (X, Y, Z).
    """

    def __init__(
        self,
        candidates: Sequence[labeled.Candidate],
        patch: Sequence[int],
        directory: str | os.PathLike,
        normalization: str = "ct",
        orientation: str = "ras",
    ):
        if not candidates:
            raise DataError("no classification candidates")
        self.patch = tuple(int(p) for p in patch)
        self.labels = np.array([c.label for c in candidates], np.int32)
        volumes_seen = sorted({c.volume for c in candidates})
        missing = [v for v in volumes_seen if not v.is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such volume (named by a classification candidate)")
        key = json.dumps(
            [[str(c.volume), list(c.centre), c.label] for c in candidates]
            + [list(self.patch), normalization, orientation, _stamp(*volumes_seen)]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = Path(directory) / f"candidates_{digest}.cubes.npy"
        if not path.is_file():
            Path(directory).mkdir(parents=True, exist_ok=True)
            _save_npy(path, self._cut(candidates, normalization, orientation))
        self.cubes = np.load(path, mmap_mode="r")

    def _cut(
        self, candidates: Sequence[labeled.Candidate], normalization: str, orientation: str
    ) -> np.ndarray:
        cubes = np.empty((len(candidates),) + self.patch, np.uint16)
        by_volume: dict[Path, list[int]] = {}
        for i, c in enumerate(candidates):
            by_volume.setdefault(c.volume, []).append(i)
        progress = Progress("cut candidates", len(candidates), "cubes")
        size = np.array(self.patch)
        for volume, indices in by_volume.items():
            image = volumes.load_volume(volume, normalization=normalization, orientation=orientation).array
            for i in indices:
                centre = np.array(candidates[i].centre)
                if np.any(centre < 0) or np.any(centre >= image.shape):
                    raise DataError(
                        f"{volume}: candidate centre {tuple(centre)} outside the volume {image.shape}"
                    )
                cubes[i] = store.encode_cubes(_crop(image, centre - size // 2, size, None), "uint16")
            progress.update(len(indices))
        return cubes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"cube": np.asarray(self.cubes[int(index)]), "label": self.labels[int(index)]}


class Subset:
    """Elements `indices` of a random-access source."""

    def __init__(self, source, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.source[int(self.indices[int(index)])]
