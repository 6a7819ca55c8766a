"""The visual-word store: ArrayRecord shards of compact cubes, labels and a manifest.

Layout of a store directory (what `StoreWriter` commits and `open_store` reads):

  manifest.json                  format, cube shape and dtype, splits, shards (records and
                                 bytes of each), per-cube metadata (label, source file,
                                 coordinate, crop size, resolution), config and seeds
  train-00000.array_record ...   one record per cube: int32 label, then the cube (X, Y, Z),
  validation-00000.array_record  little-endian, C order; uncompressed, group size 1, so a
                                 random read is one pread of one record

Cube precision. Cubes are values in [0, 1] (normalised CT) stored compactly:
- ``uint16`` (default): ``round(x * 65535)``; the largest error against float32 is
  1 / (2 * 65535) = 7.6e-6, i.e. 0.015 HU on the [-1000, 1000] HU window, far below CT noise
  (~10 HU). 2 bytes per voxel: 256 KiB per 64x64x32 cube.
- ``float16``: relative precision 2^-11; the largest error in [0, 1] is 2^-12 = 2.4e-4 near
  1.0 (0.49 HU), finer near 0. Also 2 bytes per voxel; kept for stores of values that are
  not in [0, 1].
- ``float32``: exact, 4 bytes per voxel.
`decode_cubes` turns either back into float32 in [0, 1] (on the host or, inside the train
step, on the device).

Atomicity. A writer fills a hidden temporary directory beside the target and renames it
into place only after every shard is closed and the manifest written, so an extraction
killed at any moment leaves no directory that `open_store` accepts; a stale temporary
directory from a killed run is removed by the next writer.

The released TransVW data (`train_data{r}_vwGen_ex_ref_fold{k}.0.npy` + labels) is a second,
read-only store: `ReleasedSource`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from transvw_jax.errors import DataError
from transvw_jax.fileio import atomic_write_json

FORMAT = "transvw-visual-words/1"
MANIFEST = "manifest.json"
CUBE_DTYPES = ("uint16", "float16", "float32")
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1,uncompressed"
LABEL_BYTES = 4
_UINT16_MAX = 65535.0


def encode_cubes(cubes: np.ndarray, dtype: str) -> np.ndarray:
    """Cubes with values in [0, 1] -> the store's compact dtype (little-endian)."""
    if dtype not in CUBE_DTYPES:
        raise ValueError(f"cube dtype must be one of {', '.join(CUBE_DTYPES)}, got {dtype!r}")
    cubes = np.asarray(cubes, np.float32)
    if dtype == "uint16":
        return np.rint(np.clip(cubes, 0.0, 1.0) * _UINT16_MAX).astype("<u2")
    return cubes.astype("<f2" if dtype == "float16" else "<f4")


def decode_cubes(cubes: Any) -> Any:
    """Compact cubes (numpy or jax) -> float32 in [0, 1]; uint16 is scaled by 1/65535."""
    if cubes.dtype == np.uint16:
        return cubes.astype(np.float32) * np.float32(1.0 / _UINT16_MAX)
    return cubes.astype(np.float32)


@dataclasses.dataclass
class _Split:
    """Bookkeeping of one split while it is written."""

    shards: list[dict] = dataclasses.field(default_factory=list)
    writer: ArrayRecordWriter | None = None
    in_shard: int = 0
    cubes: dict[str, list] = dataclasses.field(
        default_factory=lambda: {"label": [], "source": [], "coord": [], "size": [], "resolution": []})


class StoreWriter:
    """Streams cubes into a new store; nothing is visible at `path` until `commit`.

    Use as a context manager: leaving the block with an exception removes the temporary
    directory; `commit(...)` publishes the store (replacing an older one at `path`).
    """

    def __init__(self, path: str | os.PathLike, *, cube_shape: Sequence[int], dtype: str = "uint16",
                 records_per_shard: int = 1024):
        if dtype not in CUBE_DTYPES:
            raise ValueError(f"store dtype must be one of {', '.join(CUBE_DTYPES)}, got {dtype!r}")
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.path = Path(path)
        self.cube_shape = tuple(int(s) for s in cube_shape)
        self.dtype = dtype
        self.records_per_shard = records_per_shard
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            logging.warning("removing %s, left by an interrupted store writer", stale)
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self.tmp.mkdir()
        self._splits = {name: _Split() for name in SPLITS}
        self._sources: dict[str, int] = {}
        self._closed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._closed:
            self.abort()

    def add(self, split: str, cube: np.ndarray, label: int, *, source: str = "",
            coord: Sequence[int] = (0, 0, 0), size: Sequence[int] | None = None,
            resolution: int = 1) -> None:
        """Append one cube (values in [0, 1], shape `cube_shape`) to `split`."""
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        cube = np.asarray(cube)
        if cube.shape != self.cube_shape:
            raise ValueError(f"cube of shape {cube.shape} added to a store of {self.cube_shape} cubes")
        s = self._splits[split]
        if s.writer is None or s.in_shard == self.records_per_shard:
            self._close_shard(s)
            name = f"{split}-{len(s.shards):05d}.array_record"
            s.writer = ArrayRecordWriter(str(self.tmp / name), WRITER_OPTIONS)
            s.shards.append({"file": name, "num_records": 0})
        s.writer.write(np.int32(label).astype("<i4").tobytes() + encode_cubes(cube, self.dtype).tobytes())
        s.in_shard += 1
        s.shards[-1]["num_records"] += 1
        source_id = self._sources.setdefault(str(source), len(self._sources))
        s.cubes["label"].append(int(label))
        s.cubes["source"].append(source_id)
        s.cubes["coord"].append([int(c) for c in coord])
        s.cubes["size"].append([int(c) for c in (size if size is not None else self.cube_shape)])
        s.cubes["resolution"].append(int(resolution))

    def _close_shard(self, s: _Split) -> None:
        if s.writer is not None:
            s.writer.close()
            s.writer = None
            s.shards[-1]["bytes"] = (self.tmp / s.shards[-1]["file"]).stat().st_size
        s.in_shard = 0

    def commit(self, *, num_classes: int, config: dict | None = None, seeds: dict | None = None) -> Path:
        """Close the shards, write the manifest, and move the store to `path`."""
        splits = {}
        for name, s in self._splits.items():
            self._close_shard(s)
            splits[name] = {"num_cubes": len(s.cubes["label"]), "shards": s.shards, "cubes": s.cubes}
        manifest = {
            "format": FORMAT,
            "cube_shape": list(self.cube_shape),
            "dtype": self.dtype,
            "record": "int32 label + cube (X, Y, Z), little-endian, C order",
            "num_classes": int(num_classes),
            "sources": list(self._sources),
            "splits": splits,
            "config": config or {},
            "seeds": seeds or {},
        }
        atomic_write_json(self.tmp / MANIFEST, manifest, sort_keys=True)
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        for s in self._splits.values():
            if s.writer is not None:
                s.writer.close()
                s.writer = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._closed = True


class StoreSource:
    """Random access to one split of a store, for Grain: element i -> {"cube", "label"}.

    The cube comes back in the store's compact dtype (decode on the device); reads go
    through Grain's ArrayRecordDataSource over the split's shards in manifest order.
    """

    def __init__(self, shard_paths: Sequence[Path], cube_shape: Sequence[int], dtype: str, num_cubes: int):
        import grain

        self._paths = [str(p) for p in shard_paths]
        self._shape = tuple(cube_shape)
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._len = num_cubes
        self._source = grain.sources.ArrayRecordDataSource(self._paths) if self._paths else None

    def __len__(self) -> int:
        return self._len

    def _parse(self, record: bytes) -> dict[str, np.ndarray]:
        label = np.frombuffer(record, "<i4", count=1)[0]
        cube = np.frombuffer(record, self._dtype, offset=LABEL_BYTES).reshape(self._shape)
        return {"cube": cube, "label": label}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self._len:
            raise IndexError(f"cube {index} out of range for a split of {self._len}")
        return self._parse(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._parse(r) for r in self._source.__getitems__(list(indices))]

    def __repr__(self) -> str:
        return f"StoreSource({len(self._paths)} shards, {self._len} cubes of {self._shape} {self._dtype})"


@dataclasses.dataclass(frozen=True)
class VisualWordStore:
    """An opened, validated store: its manifest and a Grain source per split."""

    path: Path
    manifest: dict

    @property
    def cube_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["cube_shape"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def num_cubes(self, split: str) -> int:
        return int(self.manifest["splits"][split]["num_cubes"])

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.manifest["splits"][split]["cubes"]["label"], np.int32)

    def source(self, split: str) -> StoreSource:
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.path}: no split {split!r} (has {', '.join(self.manifest['splits'])})")
        entry = self.manifest["splits"][split]
        return StoreSource([self.path / s["file"] for s in entry["shards"]], self.cube_shape, self.dtype,
                           entry["num_cubes"])


def open_store(path: str | os.PathLike) -> VisualWordStore:
    """Open the store at `path` after checking the manifest against every shard.

    Checks: the manifest parses and has this format; each shard exists, has the size
    recorded at commit (a truncated or swapped shard fails here, naming the file) and opens
    with the recorded number of records; per-cube metadata matches the record counts.
    Raises DataError with one line naming the file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{path}: not a visual-word store (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("dtype") not in CUBE_DTYPES:
        raise DataError(f"{manifest_path}: unknown cube dtype {manifest.get('dtype')!r}")
    for name, entry in manifest["splits"].items():
        expected = 0
        for shard in entry["shards"]:
            file = path / shard["file"]
            if not file.is_file():
                raise DataError(f"{file}: shard listed in the manifest is missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise DataError(f"{file}: {size} bytes, the manifest says {shard['bytes']} "
                                "(truncated or replaced)")
            try:
                reader = ArrayRecordReader(str(file))
                count = reader.num_records()
                reader.close()
            except Exception as e:  # noqa: BLE001 - the C++ reader raises several types
                raise DataError(f"{file}: unreadable shard ({type(e).__name__}: {e})") from None
            if count != shard["num_records"]:
                raise DataError(f"{file}: {count} records, the manifest says {shard['num_records']}")
            expected += count
        cubes = entry["cubes"]
        if entry["num_cubes"] != expected or any(len(v) != expected for v in cubes.values()):
            raise DataError(f"{manifest_path}: split {name!r} lists {entry['num_cubes']} cubes, "
                            f"its shards hold {expected}")
    return VisualWordStore(path=path, manifest=manifest)


# --- the released TransVW layout ------------------------------------------------------------

_RELEASED = re.compile(r"^(train|val)_data(\d+)_vwGen_ex_ref_fold(\d+)\.0\.npy$")


class ReleasedSource:
    """The released TransVW training data as a read-only random-access source.

    Files `train_data{r}_vwGen_ex_ref_fold{k}.0.npy` (cubes (N, 64, 64, 32), float) with
    `train_label{r}_vwGen_ex_ref_fold{k}.0.npy` (N, 1); validation files are
    `val_data1_...` / `val_label1_...`. Arrays are memory-mapped, so opening costs nothing
    and memory stays flat; element i -> {"cube": float32 (X, Y, Z), "label": int32}.
    Labels are taken as stored in the files.

    Args:
      directory: the folder holding the .npy files.
      split: "train" or "validation".
      resolutions: which r to include (1 = the 64x64x32 crop, 2 and 3 the resized ones);
        validation files exist for r = 1 only.
      folds: which k to include; None = every fold found.
      classes: keep only the cubes whose label is below this; None = all. The original
        TransVW train.py pretrains on the first 44 classes of the released data (its fold 1
        holds 50): it keeps the first 44 x instances rows of the last fold it reads, which
        are the cubes of classes 0-43 (the files list their cubes class by class).
    """

    def __init__(self, directory: str | os.PathLike, *, split: str = "train",
                 resolutions: Iterable[int] = (1, 2, 3), folds: Iterable[int] | None = None,
                 classes: int | None = None):
        directory = Path(directory)
        if not directory.is_dir():
            raise DataError(f"{directory}: no such directory")
        prefix = {"train": "train", "validation": "val"}.get(split)
        if prefix is None:
            raise ValueError(f"split must be train or validation, got {split!r}")
        found: dict[tuple[int, int], Path] = {}
        for f in directory.iterdir():
            m = _RELEASED.match(f.name)
            if m and m.group(1) == prefix:
                found[(int(m.group(2)), int(m.group(3)))] = f
        resolutions = tuple(resolutions)
        wanted = sorted(k for k in found if k[0] in resolutions and (folds is None or k[1] in set(folds)))
        if folds is not None:
            missing = [(r, k) for r in resolutions for k in folds if (r, k) not in found]
            if missing:
                r, k = missing[0]
                raise DataError(f"{directory}: missing {prefix}_data{r}_vwGen_ex_ref_fold{k}.0.npy")
        if not wanted:
            raise DataError(f"{directory}: no {prefix}_data{{r}}_vwGen_ex_ref_fold{{k}}.0.npy files for "
                            f"resolutions {list(resolutions)}")
        if classes is not None and classes < 1:
            raise ValueError(f"classes must be >= 1 or None, got {classes}")
        self.files: list[tuple[Path, Path]] = []
        self._data: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._rows: list[np.ndarray | None] = []  # per file: the kept rows (None = all)
        for key in wanted:
            data_path = found[key]
            label_path = data_path.with_name(data_path.name.replace("_data", "_label", 1))
            data = _load_npy(data_path)
            if not label_path.is_file():
                raise DataError(f"{label_path}: labels for {data_path.name} are missing")
            labels = _load_npy(label_path)
            if data.ndim != 4:
                raise DataError(f"{data_path}: expected cubes (N, X, Y, Z), got shape {data.shape}")
            if labels.reshape(len(labels), -1).shape != (len(data), 1):
                raise DataError(f"{label_path}: expected ({len(data)}, 1) labels, got shape {labels.shape}")
            if self._data and data.shape[1:] != self._data[0].shape[1:]:
                raise DataError(f"{data_path}: cubes of {data.shape[1:]}, other files have "
                                f"{self._data[0].shape[1:]}")
            self.files.append((data_path, label_path))
            self._data.append(data)
            file_labels = np.asarray(labels).reshape(-1).astype(np.int32)
            rows = None if classes is None else np.flatnonzero(file_labels < classes)
            self._rows.append(rows)
            self._labels.append(file_labels if rows is None else file_labels[rows])
        self._offsets = np.cumsum([0] + [len(x) for x in self._labels])
        if classes is not None and self._offsets[-1] == 0:
            raise DataError(f"{directory}: no {prefix} cube has a label below classes={classes}")
        self.cube_shape = tuple(self._data[0].shape[1:])
        self.labels = np.concatenate(self._labels)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"cube {index} out of range for {len(self)} cubes")
        f = int(np.searchsorted(self._offsets, index, side="right")) - 1
        i = index - int(self._offsets[f])
        rows = self._rows[f]
        row = i if rows is None else int(rows[i])
        return {"cube": np.asarray(self._data[f][row], np.float32), "label": self._labels[f][i]}

    def __repr__(self) -> str:
        return f"ReleasedSource({len(self.files)} files, {len(self)} cubes of {self.cube_shape})"


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
