"""Labeled data for fine-tuning: cases (image + label map), splits, candidate CSVs.

Layouts read:
- nnU-Net v2 raw: `imagesTr/{case}_0000.nii.gz`, `labelsTr/{case}.nii.gz`, `dataset.json`
  (its "labels" map names to integer values, e.g. {"background": 0, "nodule": 1}; its
  "file_ending", default ".nii.gz"). Only the first channel (`_0000`) is used.
- plain folders: `images/` and `labels/` holding files of the same names.
- classification candidates: a CSV with a header `volume,x,y,z,label` (voxel coordinates
  of the cube centre, as in the nodule false-positive-reduction task), indexing the volume
  as `volumes.load_volume` returns it in finetune.orientation: reoriented to RAS+ ("ras") or
  the stored voxel order ("reference"); LUNA16's candidates.csv is in world millimetres and
  needs converting first. For prediction (`read_candidates(..., require_label=False)`) the
  label column may be absent or empty.

Every problem gets one line naming the file: an image without a label, image and label of
different shapes or affines, non-integer label values, a label value outside dataset.json's
classes, a malformed CSV row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transvw_jax.data import volumes
from transvw_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path | None  # None: a scan without ground truth (prediction only, `transvw_jax.predict`)


@dataclasses.dataclass(frozen=True)
class LabeledSet:
    cases: list[Case]
    num_classes: int  # including background
    class_names: dict[int, str]


def read_nnunet(directory: str | os.PathLike) -> LabeledSet:
    """The training cases of an nnU-Net v2 raw dataset folder."""
    directory = Path(directory)
    meta_path = directory / "dataset.json"
    if not meta_path.is_file():
        raise DataError(f"{directory}: no dataset.json (not an nnU-Net raw dataset)")
    try:
        meta = json.loads(meta_path.read_text())
        labels = {int(v): str(k) for k, v in meta["labels"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{meta_path}: unreadable or without a 'labels' map ({e})") from None
    ending = meta.get("file_ending", ".nii.gz")
    images = sorted((directory / "imagesTr").glob(f"*_0000{ending}"))
    if not images:
        raise DataError(f"{directory / 'imagesTr'}: no images named <case>_0000{ending}")
    cases = []
    for image in images:
        name = image.name[: -len(f"_0000{ending}")]
        label = directory / "labelsTr" / f"{name}{ending}"
        if not label.is_file():
            raise DataError(f"{image}: case {name!r} has no label {label}")
        cases.append(Case(name, image, label))
    return LabeledSet(cases, max(labels) + 1, labels)


def read_folders(images: str | os.PathLike, labels: str | os.PathLike, num_classes: int) -> LabeledSet:
    """Cases from two folders whose files pair up by name."""
    files = volumes.list_volume_files(images)
    if not files:
        raise DataError(f"{images}: no volumes")
    cases = []
    for image in files:
        label = Path(labels) / image.name
        if not label.is_file():
            raise DataError(f"{image}: no label {label}")
        cases.append(Case(image.name[: -len(volumes.volume_suffix(image))], image, label))
    return LabeledSet(cases, num_classes, {i: str(i) for i in range(num_classes)})


def load_case(case: Case, num_classes: int, normalization: str = "ct",
              orientation: str = "ras") -> tuple[np.ndarray, np.ndarray]:
    """(image float32 in [0, 1], label int32) of one case, checked against each other.

    Image and label are read in the same `orientation` (volumes.ORIENTATIONS), so their
    voxels pair up whichever it is.
    """
    image = volumes.load_volume(case.image, normalization=normalization, orientation=orientation)
    label = volumes.read_raw(case.label, orientation)
    if image.array.shape != label.array.shape:
        raise DataError(f"{case.label}: label shape {label.array.shape} differs from the image's "
                        f"{image.array.shape} ({case.image.name})")
    if image.affine is not None and label.affine is not None and not np.allclose(image.affine, label.affine,
                                                                                   atol=1e-3):
        raise DataError(f"{case.label}: label affine differs from the image's ({case.image.name})")
    values = label.array
    if not np.all(values == np.round(values)):
        raise DataError(f"{case.label}: label values are not integers")
    values = values.astype(np.int32)
    high = int(values.max()) if values.size else 0
    if values.min() < 0 or high >= num_classes:
        raise DataError(f"{case.label}: label value {high if high >= num_classes else int(values.min())} "
                        f"outside the {num_classes} classes of the dataset")
    return image.array, values


def split_cases(names: Sequence[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """A seeded train/validation split of case names (at least one of each when possible)."""
    names = sorted(names)
    n_val = int(round(val_fraction * len(names)))
    if val_fraction > 0 and len(names) > 1:
        n_val = min(max(n_val, 1), len(names) - 1)
    order = np.random.default_rng([seed, 4]).permutation(len(names))
    val = sorted(names[i] for i in order[:n_val])
    return {"train": [n for n in names if n not in set(val)], "validation": val}


@dataclasses.dataclass(frozen=True)
class Candidate:
    volume: Path
    centre: tuple[int, int, int]
    label: int | None  # None only from read_candidates(require_label=False): a row to predict


def read_candidates(path: str | os.PathLike, volumes_dir: str | os.PathLike | None = None,
                    require_label: bool = True) -> list[Candidate]:
    """Rows of a `volume,x,y,z,label` CSV (relative volume paths resolved from `volumes_dir`).

    With `require_label=False` (prediction on unseen candidates) the label column may be
    missing, or empty in a row, which gives `label=None`.
    """
    path = Path(path)
    base = Path(volumes_dir) if volumes_dir else path.parent
    try:
        rows = list(csv.DictReader(path.open(newline="")))
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    expected = "volume,x,y,z,label" if require_label else "volume,x,y,z[,label]"
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            centre = (int(row["x"]), int(row["y"]), int(row["z"]))
            text = row["label"] if require_label else (row.get("label") or "").strip()
            label = int(text) if require_label or text != "" else None
            volume = Path(row["volume"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{line}: expected {expected} with integer x, y, z and label, "
                            f"got {dict(row)}") from None
        out.append(Candidate(volume if volume.is_absolute() else base / volume, centre, label))
    if not out:
        raise DataError(f"{path}: no candidates")
    return out
