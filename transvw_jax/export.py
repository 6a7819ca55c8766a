"""Flax variables <-> PyTorch state_dicts of the reference YNet3D / UNet3D.

The Flax module tree mirrors the reference attribute names (see models/unet3d.py), so the
mapping is mechanical: the path `down_tr64/ops_0/conv1/kernel` is the key
`down_tr64.ops.0.conv1.weight`, with the layout transposed (models/layers.py lists the
layouts). Files:
  .pt           {'state_dict': {key: torch.Tensor}}, read with torch.load(weights_only=True)
                (never arbitrary unpickling); needs the `torch` extra.
  .safetensors  the same keys and layouts; no torch needed.
  .h5 / .hdf5   Keras weights of the original Models Genesis / TransVW releases, read only
                (`keras_weights`; needs the `keras` extra).
Every file is written to a temporary name and renamed, so a crash never leaves a
half-written export behind.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from transvw_jax import keras_weights
from transvw_jax.errors import CheckpointError
from transvw_jax.fileio import atomic_write

log = logging.getLogger(__name__)

HEAD_PREFIX = "clc_out."
KERAS_SUFFIXES = (".h5", ".hdf5")
# Reference registration order of the top-level blocks; keys are emitted in this order.
_TOP_ORDER = [
    "down_tr64", "down_tr128", "down_tr256", "down_tr512",
    "up_tr256", "up_tr128", "up_tr64", "out_tr", "clc_out",
]
_BN_STATS = {"mean": "running_mean", "var": "running_var"}
_OPS_FLAX = re.compile(r"^ops_(\d+)$")

Variables = dict[str, Any]


# --------------------------------------------------------------------------- layouts
def _weight_to_torch(module: str, kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 2:  # Dense (in, out) -> Linear (out, in)
        return kernel.T
    if module == "up_conv":  # (2, 2, 2, in, out) -> ConvTranspose3d (in, out, 2, 2, 2)
        return kernel.transpose(3, 4, 0, 1, 2)
    return kernel.transpose(4, 3, 0, 1, 2)  # (kx, ky, kz, in, out) -> Conv3d (out, in, ...)


def _weight_from_torch(module: str, weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 2:
        return weight.T
    if module == "up_conv":
        return weight.transpose(2, 3, 4, 0, 1)
    return weight.transpose(2, 3, 4, 1, 0)


def _torch_prefix(path: tuple[str, ...]) -> str:
    return ".".join(re.sub(_OPS_FLAX, r"ops.\1", p) for p in path)


_SEGMENT_ORDER = {
    **{name: i for i, name in enumerate(_TOP_ORDER)},
    "up_conv": 0, "ops": 1, "conv1": 0, "bn1": 1, "fc1": 2, "final_conv": 0,
    "weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4,
}


def _key_order(key: str) -> tuple:
    """Sort key giving PyTorch's registration order (jax sorts dict keys by name)."""
    return tuple(
        (int(p), "") if p.isdigit() else (_SEGMENT_ORDER.get(p, len(_SEGMENT_ORDER)), p)
        for p in key.split(".")
    )


# --------------------------------------------------------------------------- Flax -> torch
def to_torch_state_dict(
    variables: Mapping[str, Any], head: bool = True, num_batches_tracked: int = 0
) -> dict[str, np.ndarray]:
    """Convert Flax variables to a reference-compatible PyTorch state_dict of numpy arrays.

    Args:
      variables: `{'params': ..., 'batch_stats': ...}` of UNet3D, YNet3D or
        EncoderClassifier.
      head: keep the visual-word head (`clc_out.*`); False gives UNet3D's keys.
      num_batches_tracked: value of every BatchNorm's `num_batches_tracked` (int64). The
        reference's BatchNorm never increments it, so released checkpoints hold 0.

    Returns:
      {key: array} in the reference key order, float32 weights in PyTorch layouts.
    """
    if "params" not in variables:
        raise CheckpointError("variables have no 'params' collection")
    params = flatten_dict(dict(variables["params"]))
    stats = flatten_dict(dict(variables.get("batch_stats", {})))
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        module, leaf = path[:-1], path[-1]
        prefix = _torch_prefix(module)
        value = np.asarray(value, dtype=np.float32)
        if leaf == "kernel":
            out[f"{prefix}.weight"] = _weight_to_torch(module[-1], value)
        elif leaf == "scale":
            out[f"{prefix}.weight"] = value
            for name in ("mean", "var"):
                stat = stats.get(module + (name,))
                if stat is None:
                    raise CheckpointError(f"batch_stats missing for {'/'.join(module)}/{name}")
                out[f"{prefix}.{_BN_STATS[name]}"] = np.asarray(stat, dtype=np.float32)
            out[f"{prefix}.num_batches_tracked"] = np.array(num_batches_tracked, dtype=np.int64)
        elif leaf == "bias":
            out[f"{prefix}.bias"] = value
        else:
            raise CheckpointError(f"unexpected parameter {'/'.join(path)}")
    if not head:
        out = {k: v for k, v in out.items() if not k.startswith(HEAD_PREFIX)}
    return {k: np.array(out[k], order="C") for k in sorted(out, key=_key_order)}


# --------------------------------------------------------------------------- torch -> Flax
def _strip_module_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        while key.startswith("module."):  # nn.DataParallel / DistributedDataParallel
            key = key[len("module."):]
        out[key] = _to_numpy(value)
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _flax_path(key: str) -> tuple[tuple[str, ...], str] | None:
    """'up_tr256.ops.0.bn1.running_var' -> (('up_tr256', 'ops_0', 'bn1'), 'running_var')."""
    parts = key.split(".")
    if len(parts) < 2:
        return None
    module: list[str] = []
    i = 0
    while i < len(parts) - 1:
        if parts[i] == "ops" and i + 1 < len(parts) - 1 and parts[i + 1].isdigit():
            module.append(f"ops_{parts[i + 1]}")
            i += 2
        else:
            module.append(parts[i])
            i += 1
    return tuple(module), parts[-1]


def _convert_torch(state_dict: Mapping[str, np.ndarray]) -> Variables:
    params: dict[tuple[str, ...], np.ndarray] = {}
    stats: dict[tuple[str, ...], np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        parsed = _flax_path(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, leaf = parsed
        is_bn = module[-1].startswith("bn")
        if leaf == "num_batches_tracked":
            continue
        if leaf in ("running_mean", "running_var"):
            stats[module + ("mean" if leaf == "running_mean" else "var",)] = value.astype(np.float32)
        elif leaf == "weight" and is_bn:
            params[module + ("scale",)] = value.astype(np.float32)
        elif leaf == "weight" and value.ndim in (2, 5):
            params[module + ("kernel",)] = _weight_from_torch(module[-1], value.astype(np.float32))
        elif leaf == "bias":
            params[module + ("bias",)] = value.astype(np.float32)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"keys not in the reference layout: {', '.join(sorted(unknown))}")
    return {"params": unflatten_dict(params), "batch_stats": unflatten_dict(stats)}


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The reference key of a Flax leaf (for messages)."""
    module, leaf = path[:-1], path[-1]
    if collection == "batch_stats":
        name = _BN_STATS[leaf]
    else:
        name = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return f"{_torch_prefix(module)}.{name}"


def from_torch_state_dict(
    state_dict: Mapping[str, Any],
    like: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> Variables:
    """Convert a reference PyTorch state_dict (or a released checkpoint's) to Flax variables.

    Args:
      state_dict: {key: tensor or array}; 'module.' prefixes (DataParallel) are removed.
      like: the target model's variables (arrays, or shapes from `jax.eval_shape`). When
        given, every key is checked against it: shape mismatches and unknown keys are
        errors naming the key; a missing visual-word head (`clc_out.*`, e.g. Models
        Genesis weights loaded into YNet3D) is taken from `like` and logged.
      strict: with `like`, also fail on other missing keys and on extra keys. With
        strict=False, extra keys are dropped and missing ones taken from `like`, both
        logged by name (e.g. a YNet3D checkpoint into UNet3D or EncoderClassifier).

    Returns:
      {'params': ..., 'batch_stats': ...}: float32 numpy arrays from the file; entries kept
      from `like` (a missing head) are its arrays.

    Raises:
      CheckpointError with one line naming the keys at fault.
    """
    loaded = _convert_torch(_strip_module_prefix(state_dict))
    if like is None:
        return loaded
    return _merge_into(loaded, like, strict)


def _merge_into(loaded: Variables, like: Mapping[str, Any], strict: bool) -> Variables:
    result: Variables = {}
    missing, extra, mismatched = [], [], []
    abstract_missing = False
    for collection in ("params", "batch_stats"):
        target = flatten_dict(dict(like.get(collection, {})))
        source = flatten_dict(loaded.get(collection, {}))
        merged = {}
        for path, ref in target.items():
            key = _torch_key(collection, path)
            if path not in source:
                missing.append(key)
                abstract_missing |= isinstance(ref, jax.ShapeDtypeStruct)
                merged[path] = ref
                continue
            value = source[path]
            if tuple(value.shape) != tuple(ref.shape):
                mismatched.append(f"{key} {_torch_shape(collection, path, value.shape)}"
                                  f" != expected {_torch_shape(collection, path, ref.shape)}")
            merged[path] = value
        extra += [_torch_key(collection, p) for p in source if p not in target]
        result[collection] = unflatten_dict(merged)
    if mismatched:
        raise CheckpointError("shape mismatch: " + "; ".join(mismatched))
    other_missing = [k for k in missing if not k.startswith(HEAD_PREFIX)]
    if strict and other_missing:
        raise CheckpointError(f"missing keys: {', '.join(other_missing)}")
    if strict and extra:
        raise CheckpointError(f"unexpected keys (use strict=False to drop them): {', '.join(extra)}")
    if missing:
        if abstract_missing:
            raise CheckpointError(
                f"missing keys {', '.join(missing)}: pass initialised variables (not shapes) as "
                "`like` to keep them from the initialisation"
            )
        kind = "visual-word head" if not other_missing else "keys"
        log.warning("%s not in the checkpoint, kept from initialisation: %s", kind, ", ".join(missing))
    if extra:
        log.warning("dropped keys the model does not have: %s", ", ".join(extra))
    return result


def _torch_shape(collection: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple:
    """A Flax leaf shape as the reference PyTorch shape, so messages read like the file."""
    if collection == "params" and path[-1] == "kernel":
        dummy = np.empty(shape, dtype=np.uint8)
        return tuple(_weight_to_torch(path[-2], dummy).shape)
    return tuple(shape)


# --------------------------------------------------------------------------- files
def _import_torch(path: Path):
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: .pt files need PyTorch; install the extra: pip install 'transvw-jax[torch]'"
        ) from None
    return torch


def save(path: str | os.PathLike, variables: Mapping[str, Any], head: bool = True) -> Path:
    """Write the reference state_dict to `path`, by suffix: `.pt` or `.safetensors`."""
    path = Path(path)
    state_dict = to_torch_state_dict(variables, head=head)
    if path.suffix == ".pt":
        torch = _import_torch(path)
        tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
        atomic_write(path, lambda tmp: torch.save({"state_dict": tensors}, str(tmp)))
    elif path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        meta = {"format": "pt", "producer": "transvw_jax"}
        atomic_write(path, lambda tmp: save_file(state_dict, str(tmp), metadata=meta))
    else:
        raise CheckpointError(f"{path}: unknown format; use a .pt or .safetensors suffix")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a reference-layout state_dict from `.pt` / `.pth` / `.safetensors`, or the
    state_dict of a Keras `.h5` / `.hdf5` release after conversion (`keras_weights`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() in KERAS_SUFFIXES:
        return to_torch_state_dict(keras_weights.load(path))
    if path.suffix in (".pt", ".pth"):
        torch = _import_torch(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: not a readable PyTorch weights file ({reason})") from None
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
            raise CheckpointError(f"{path}: expected a state_dict or a dict with a 'state_dict' entry")
        return {k: _to_numpy(v) for k, v in obj.items()}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    raise CheckpointError(f"{path}: unknown format; use a .pt, .pth, .safetensors, .h5 or .hdf5 file")


def load(
    path: str | os.PathLike, like: Mapping[str, Any] | None = None, strict: bool = True
) -> Variables:
    """Read `path` and convert it to Flax variables (see `from_torch_state_dict`).

    `.h5` / `.hdf5` files are the Keras releases (`keras_weights.load`); `like` and
    `strict` then apply as for a PyTorch file (the TransVW Keras head is never in it, so
    a YNet3D or EncoderClassifier `like` keeps its head, logged).
    """
    path = Path(path)
    if path.suffix.lower() in KERAS_SUFFIXES:
        loaded = keras_weights.load(path)
        if like is None:
            return loaded
        try:
            return _merge_into(loaded, like, strict)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    state_dict = read_state_dict(path)
    try:
        return from_torch_state_dict(state_dict, like=like, strict=strict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(path: str | os.PathLike,
                 what: str = "weights file or run directory") -> tuple[str, int | None, dict] | None:
    """(where, step, {"params", "batch_stats"}) from a weight file (`load`; step None) or a
    run directory (its best checkpoint, else its latest; `checkpointing.read_stored_variables`).

    None when the directory holds no complete checkpoint (the caller says what to run
    first); CheckpointError naming `what` when nothing is at `path`.
    """
    path = Path(path)
    if path.is_file():
        return str(path), None, load(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such {what}")
    from transvw_jax import checkpointing  # Orbax: only for directories

    found = checkpointing.read_stored_variables(path)
    return None if found is None else (str(found[0]), int(found[1]), found[2])
