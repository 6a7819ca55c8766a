"""Whole-volume segmentation outputs: predicted masks as NIfTI, overlays, a per-case report.

`segment_cases` runs sliding-window inference on each case, writes the argmax mask as
`<out>/masks/<case>.nii.gz` with the INPUT's affine in the orientation it was read in (so
it overlays the scan in any viewer), scores it against the label (Dice / IoU per class),
draws a PNG overlay of the axial slice with the most foreground (image in grey, ground
truth green, prediction red, overlap yellow), and writes `<out>/report.json` with the
per-case figures and mean +- sd per class. Every file is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import nibabel as nib
import numpy as np
from PIL import Image

from transvw_jax import evaluation, inference
from transvw_jax.data import labeled, volumes
from transvw_jax.fileio import atomic_write, atomic_write_json
from transvw_jax.progress import Progress
from transvw_jax.samples import save_png


def write_mask(path: str | os.PathLike, mask: np.ndarray, affine: np.ndarray | None) -> Path:
    """Save an integer mask (X, Y, Z) as uint8 NIfTI with `affine`, atomically."""
    image = nib.Nifti1Image(np.asarray(mask, np.uint8), np.eye(4) if affine is None else affine)
    return atomic_write(path, lambda tmp: nib.save(image, str(tmp)), suffix=".tmp.nii.gz")


def overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, scale: int = 3) -> Image.Image:
    """RGB axial slice with the most foreground: grey image, truth green, prediction red."""
    z = int(np.argmax(((truth > 0) | (prediction > 0)).sum(axis=(0, 1))))
    grey = (np.clip(image[:, :, z], 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=-1)
    t, p = truth[:, :, z] > 0, prediction[:, :, z] > 0
    rgb[t & ~p] = (0, 200, 0)
    rgb[p & ~t] = (220, 0, 0)
    rgb[p & t] = (230, 230, 0)
    img = Image.fromarray(rgb)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def segment_cases(predict: Callable[..., jax.Array], cases: Sequence[labeled.Case], num_classes: int,
                  window: Sequence[int], out: str | os.PathLike, *, overlap: float = 0.5, batch_size: int = 4,
                  normalization: str = "ct", blending: str = "gaussian", params: Any = None,
                  orientation: str = "ras") -> dict:
    """Predict, save, score and draw every case; returns (and writes) the report.

    `predict`, `overlap`, `batch_size`, `blending`, `params`: as in `inference.sliding_window`.
    `orientation`: how the cases are read (volumes.ORIENTATIONS); the mask is saved with the
    affine of the image read the same way, so it lands on the scan's voxels either way.
    """
    out = Path(out)
    per_case = {}
    progress = Progress("segment", len(cases), "cases")
    for case in cases:
        image, truth = labeled.load_case(case, num_classes, normalization, orientation)
        probs = inference.sliding_window(predict, image, window, overlap=overlap, batch_size=batch_size,
                                         blending=blending, params=params)
        mask = np.argmax(probs, axis=-1) if probs.shape[-1] > 1 else (probs[..., 0] > 0.5).astype(np.int32)
        affine = volumes.read_raw(case.image, orientation).affine
        write_mask(out / "masks" / f"{case.name}.nii.gz", mask, affine)
        scores = evaluation.dice_iou(mask, truth, num_classes)
        per_case[case.name] = {k: v.tolist() for k, v in scores.items()}
        save_png(overlay(image, truth, mask), out / "overlays" / f"{case.name}.png")
        progress.update()
    summary = {}
    for metric in ("dice", "iou"):
        for c in range(num_classes):
            mean, sd = evaluation.mean_sd([v[metric][c] for v in per_case.values()])
            summary[f"{metric}_class{c}"] = {"mean": mean, "sd": sd}
    report = {"cases": per_case, "summary": summary}
    atomic_write_json(out / "report.json", report, indent=1)
    return report
