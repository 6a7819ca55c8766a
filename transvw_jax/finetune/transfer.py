"""Pretrained weights into a fine-tuning network.

From a pretraining workdir (its `best/`, else the latest checkpoint), our export or the
released weight files (`export.load`). `transfer` copies the parts chosen by
`finetune.load` (encoder down_tr*, decoder up_tr*, output out_tr, head clc_out); an output
or head whose shape differs (another class count) keeps its fresh initialisation, any
other mismatch is an error naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from transvw_jax import export
from transvw_jax.configuration import PARTS
from transvw_jax.errors import CheckpointError

REINIT_ON_MISMATCH = ("output", "head")  # parts whose shape follows the class count


def read_pretrained(path: str | Path) -> tuple[str, dict]:
    """(description, numpy variables) from a pretraining workdir or an exported/released file."""
    found = export.read_weights(path, "pretraining workdir or weights file")
    if found is None:
        raise CheckpointError(
            f"{path}: no best/ or checkpoints/ with a complete step: pretrain first "
            f"(python -m transvw_jax.main --config configs/demo.py --workdir {path})"
        )
    where, _, variables = found
    return where, variables


def _part(path: tuple[str, ...]) -> str | None:
    for part, prefix in PARTS.items():
        if path[0].startswith(prefix):
            return part
    return None


def transfer(
    fresh: dict, pretrained: dict, parts: Sequence[str], source: str = "pretrained"
) -> tuple[dict, dict]:
    """Copy the entries of `parts` from `pretrained` into `fresh` (both numpy trees).

    Returns:
      (variables, report): report lists "loaded", "reinitialised" (output/head of another
      shape) and "fresh" (not selected) keys as "collection/module/.../leaf".

    Raises:
      CheckpointError naming the key: a selected entry missing from `pretrained`, or of
      another shape outside the output/head (another width or architecture).
    """
    report: dict[str, list[str]] = {"loaded": [], "reinitialised": [], "fresh": []}
    out = {}
    for collection in sorted(fresh, key=lambda c: c != "params"):  # parameters first in messages
        tree = fresh[collection]
        source_flat = flatten_dict(dict(pretrained.get(collection, {})))
        merged = {}
        for path, value in flatten_dict(dict(tree)).items():
            key = "/".join((collection,) + path)
            part = _part(path)
            if part not in parts:
                merged[path] = value
                report["fresh"].append(key)
                continue
            if path not in source_flat:
                raise CheckpointError(
                    f"{source}: has no {key} to load the {part} from (finetune.load={tuple(parts)})"
                )
            stored = np.asarray(source_flat[path])
            if stored.shape != np.shape(value):
                if part in REINIT_ON_MISMATCH:
                    merged[path] = value
                    report["reinitialised"].append(key)
                    continue
                raise CheckpointError(
                    f"{source}: {key} has shape {stored.shape}, the fine-tuning model needs "
                    f"{np.shape(value)} (another model.width or architecture?)"
                )
            merged[path] = stored.astype(np.asarray(value).dtype)
            report["loaded"].append(key)
        out[collection] = unflatten_dict(merged)
    return out, report
