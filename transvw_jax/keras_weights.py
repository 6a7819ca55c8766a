"""Keras `.h5` weights of the original Models Genesis / TransVW releases -> Flax variables.

The Keras networks (Models Genesis `keras/unet3d.py`, TransVW `keras/models/ynet3d.py`)
are the 3D U-Net of depth 4 that our UNet3D implements, channels-first, built in this
order:
  encoder   8 x [Conv3D 3x3x3 'same' + bias -> BatchNormalization(axis=1) -> ReLU], two per
            level (n, 2n channels at level d, n = width * 2^d), a 2x max-pool after levels 0-2;
  decoder   3 x [UpSampling3D(2) (or, built with deconvolution=True, a Conv3DTranspose of
            kernel 2, stride 2, keeping the channel count) -> concatenate([upsampled, skip])
            on the channel axis -> 2 x (Conv3D, BN, ReLU) with the skip's channel count];
  output    Conv3D 1x1x1 (n_labels) -> sigmoid;
  TransVW   a head on the bottleneck: Conv3D (512), BN, ReLU, global average pool,
            Dense(1024, relu) 'cls_fc', Dense(classes, softmax) 'cls_output'.
Blocks are named `depth_<i>_conv` / `depth_<i>_bn` with i counting blocks in creation
order; other layers carry Keras's per-class counters (`conv3d_1`, `dense_3`, ...), whose
offset depends on what the session built before. So layers are matched by structure:
each kind (3x3x3 conv, BatchNormalization, 2x2x2 transposed conv, 1x1x1 conv, Dense) is
put in creation order by the number in its name (the file's own order where names carry
none), then checked against the shapes the U-Net of the first conv's width needs.

Conversions:
  - Conv3D kernels are (kx, ky, kz, in, out) in Keras whatever the data format: our
    layout, unchanged. Conv3DTranspose kernels are (kx, ky, kz, out, in): the last two
    axes swap. Dense kernels are (in, out), unchanged.
  - UpSampling3D (nearest neighbour, no weights) is exactly our transposed convolution
    with an identity kernel at each of the 2x2x2 positions and a zero bias.
  - BatchNormalization: gamma/beta -> scale/bias, moving_mean/moving_variance ->
    batch_stats mean/var. Keras normalises with epsilon 1e-3 (read from the file's
    model_config where it has one), our BatchNorm with 1e-5: the difference is added to
    the stored variance, so inference on running statistics (`bn="standard"`,
    train=False) computes what the Keras model computes. Keras's momentum (0.99, i.e.
    PyTorch's 0.01) is a training setting and is not stored.
  - The TransVW head (conv 512 -> dense 1024 -> dense) has no counterpart in YNet3D's
    head (conv 32*width -> dense): it is not converted, and a warning names its layers,
    as are Dense layers on an encoder (a downstream classifier). The result then holds
    the U-Net (or the encoder) only; `export.load(..., like=...)` keeps the missing head
    from the model's initialisation.

Files: a whole-model save (`model.save`, `ModelCheckpoint`: weights under
`model_weights/`) and a `save_weights` file (weights at the root), Keras 2 / tf.keras
HDF5 layout: the group's `layer_names` attribute lists the layers, each layer group's
`weight_names` its arrays. h5py is an optional extra (`pip install 'transvw-jax[keras]'`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transvw_jax.errors import CheckpointError

log = logging.getLogger(__name__)

KERAS_BN_EPSILON = 1e-3  # Keras's BatchNormalization default, used by both originals
FLAX_BN_EPSILON = 1e-5  # models.layers.BatchNorm
DEPTH = 4
ENCODER_CONVS = 2 * DEPTH
DECODER_CONVS = 2 * (DEPTH - 1)

Variables = dict[str, Any]


@dataclass
class _Layer:
    """One Keras layer that has weights, as stored in the file."""

    name: str
    weights: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (short name, array)

    def get(self, name: str, index: int) -> np.ndarray | None:
        """The weight called `name` (e.g. 'kernel'), else the one at `index`."""
        for short, value in self.weights:
            if short == name:
                return value
        return self.weights[index][1] if index < len(self.weights) else None

    def shapes(self) -> str:
        return ", ".join(f"{short} {tuple(v.shape)}" for short, v in self.weights)


# --------------------------------------------------------------------------- reading
def _import_h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            f"{path}: Keras .h5 files need h5py; install the extra: pip install 'transvw-jax[keras]'"
        ) from None
    return h5py


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _names_attribute(group: Any, name: str) -> list[str] | None:
    """A list-of-names attribute; Keras splits one over 64 KiB into name0, name1, ..."""
    if name in group.attrs:
        return [_text(v) for v in np.atleast_1d(group.attrs[name])]
    if f"{name}0" not in group.attrs:
        return None
    names, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        names += [_text(v) for v in np.atleast_1d(group.attrs[f"{name}{chunk}"])]
        chunk += 1
    return names


def _short_name(weight_name: str) -> str:
    """'depth_0_conv/kernel:0' -> 'kernel'."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _bn_epsilons(model_config: Any) -> dict[str, float]:
    """{layer name: epsilon} of the BatchNormalization layers in a whole-model save's config."""
    try:
        config = json.loads(_text(model_config))
        layers = config["config"]["layers"]
        return {layer["config"]["name"]: float(layer["config"]["epsilon"]) for layer in layers
                if layer.get("class_name") == "BatchNormalization" and "epsilon" in layer.get("config", {})}
    except (ValueError, KeyError, TypeError):
        return {}  # an unreadable config leaves Keras's default, which both originals use


def _read_layers(path: Path) -> tuple[list[_Layer], dict[str, float]]:
    h5py = _import_h5py(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise CheckpointError(f"{path}: not an HDF5 file (a Keras .h5 weight file was expected)")
    try:
        with h5py.File(path, "r") as f:
            group = f["model_weights"] if "model_weights" in f else f
            names = _names_attribute(group, "layer_names")
            if names is None:
                raise CheckpointError(
                    f"{path}: no Keras layer list ('layer_names' attribute): not a Keras 2 weight file "
                    "(model.save / save_weights)"
                )
            epsilons = _bn_epsilons(f.attrs["model_config"]) if "model_config" in f.attrs else {}
            layers = []
            for name in names:
                if name not in group:
                    raise CheckpointError(f"{path}: layer {name!r} is listed but has no weights group")
                weight_names = _names_attribute(group[name], "weight_names") or []
                # A model saved as one layer of another (e.g. keras.utils.multi_gpu_model's
                # wrapper) stores all its weights under one group: split them by the layer
                # named in each weight name ('depth_0_conv/kernel:0').
                inner: dict[str, _Layer] = {}
                for weight_name in weight_names:
                    if weight_name not in group[name]:
                        raise CheckpointError(f"{path}: layer {name!r} lacks its weight {weight_name!r}")
                    owner = weight_name.rsplit("/", 2)[-2] if "/" in weight_name else name
                    layer = inner.setdefault(owner, _Layer(owner))
                    layer.weights.append((_short_name(weight_name),
                                          np.asarray(group[name][weight_name], dtype=np.float32)))
                layers += inner.values()
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:  # h5py's errors for damaged files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{path}: unreadable HDF5 file ({reason})") from None
    return layers, epsilons


# --------------------------------------------------------------------------- structure
def _number(name: str) -> int | None:
    """Creation number in a layer name: depth_<i>_..., <class>_<n>; Keras's first
    instance of a class may carry no number (tf.keras: 'conv3d', then 'conv3d_1')."""
    if m := re.fullmatch(r"depth_(\d+)_\w+", name):
        return int(m.group(1))
    if m := re.search(r"_(\d+)$", name):
        return int(m.group(1))
    return None if re.search(r"\d", name) else 0


def _creation_order(layers: list[_Layer]) -> list[_Layer]:
    """`layers` (one kind) sorted by the number in their names; the file's order when the
    names do not give one number each (a model's layer list is ordered by graph depth,
    which interleaves a branch such as the TransVW head with the decoder)."""
    numbers = [_number(layer.name) for layer in layers]
    if None in numbers or len(set(numbers)) != len(numbers):
        return list(layers)
    return [layer for _, layer in sorted(zip(numbers, layers, strict=True), key=lambda t: t[0])]


def _classify(path: Path, layers: list[_Layer]) -> dict[str, list[_Layer]]:
    kinds: dict[str, list[_Layer]] = {"conv3": [], "conv1": [], "up": [], "bn": [], "dense": []}
    for layer in layers:
        shorts = {short for short, _ in layer.weights}
        first = layer.weights[0][1]
        vectors = len(layer.weights) == 4 and all(v.ndim == 1 for _, v in layer.weights)
        if "moving_mean" in shorts or vectors:
            kinds["bn"].append(layer)
        elif first.ndim == 5 and first.shape[:3] == (3, 3, 3):
            kinds["conv3"].append(layer)
        elif first.ndim == 5 and first.shape[:3] == (1, 1, 1):
            kinds["conv1"].append(layer)
        elif first.ndim == 5 and first.shape[:3] == (2, 2, 2):
            kinds["up"].append(layer)
        elif first.ndim == 2:
            kinds["dense"].append(layer)
        else:
            raise CheckpointError(
                f"{path}: layer {layer.name!r} ({layer.shapes()}) fits no layer of the Keras 3D U-Net"
            )
    return {kind: _creation_order(found) for kind, found in kinds.items()}


def _conv(path: Path, layer: _Layer, expected: tuple[int, ...], transposed: bool = False) -> dict:
    kernel = layer.get("kernel", 0)
    if transposed:  # Conv3DTranspose stores (kx, ky, kz, out, in)
        kernel = kernel.transpose(0, 1, 2, 4, 3)
    if tuple(kernel.shape) != expected:
        what = "transposed-conv kernel (as in, out)" if transposed else "kernel"
        raise CheckpointError(
            f"{path}: layer {layer.name!r} has {what} {tuple(kernel.shape)}, the Keras U-Net needs "
            f"{expected} there (another architecture or depth?)"
        )
    bias = layer.get("bias", 1)
    if bias is None or len(layer.weights) == 1:  # use_bias=False
        bias = np.zeros(expected[-1], np.float32)
    if bias.shape != (expected[-1],):
        raise CheckpointError(
            f"{path}: layer {layer.name!r} has bias {bias.shape}, expected ({expected[-1]},)")
    return {"kernel": np.ascontiguousarray(kernel), "bias": bias}


def _bn(path: Path, layer: _Layer, channels: int, epsilon: float) -> tuple[dict, dict]:
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    arrays = [layer.get(name, i) for i, name in enumerate(names)]
    if len(layer.weights) != 4 or any(a is None or a.shape != (channels,) for a in arrays):
        raise CheckpointError(
            f"{path}: layer {layer.name!r} ({layer.shapes()}) is not a BatchNormalization of {channels} "
            "channels (gamma, beta, moving_mean, moving_variance) after its convolution"
        )
    gamma, beta, mean, variance = arrays
    # Our BatchNorm adds 1e-5; adding the rest of Keras's epsilon here keeps
    # var + eps, hence the normalisation, the same.
    var = np.maximum(variance + np.float32(epsilon - FLAX_BN_EPSILON), 0).astype(np.float32)
    return {"scale": gamma, "bias": beta}, {"mean": mean, "var": var}


def _set(tree: dict, path: tuple[str, ...], value: dict) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _to_variables(path: Path, layers: list[_Layer], epsilons: dict[str, float]) -> Variables:
    """Map the weighted layers of a Keras U-Net / YNet / encoder onto our module names."""
    kinds = _classify(path, layers)
    convs, bns, ups, finals = kinds["conv3"], kinds["bn"], kinds["up"], kinds["conv1"]
    if not convs:
        raise CheckpointError(f"{path}: no 3x3x3 Conv3D layers: not a Keras 3D U-Net weight file")
    if not bns:
        raise CheckpointError(
            f"{path}: no BatchNormalization layers: a Keras U-Net built without batch_normalization "
            "does not fit our models, which normalise after every convolution"
        )
    if len(finals) > 1:
        raise CheckpointError(f"{path}: {len(finals)} 1x1x1 Conv3D layers "
                              f"({', '.join(f.name for f in finals)}); the Keras U-Net has one output layer")
    needed = ENCODER_CONVS + (DECODER_CONVS if finals else 0)
    # A TransVW file has one more block (its head conv), created after the U-Net.
    allowed_extra = 1 if finals else 0
    if not needed <= len(convs) <= needed + allowed_extra or len(bns) != len(convs):
        described = ("U-Net (8 encoder and 6 decoder blocks, plus 1 in a TransVW head)" if finals
                     else "encoder (8 blocks; a U-Net has a 1x1x1 output Conv3D, none found)")
        raise CheckpointError(
            f"{path}: {len(convs)} 3x3x3 Conv3D and {len(bns)} BatchNormalization layers do not fit the "
            f"Keras {described} of depth {DEPTH}: another architecture?"
        )
    if ups and (not finals or len(ups) != DEPTH - 1):
        raise CheckpointError(f"{path}: {len(ups)} 2x2x2 transposed convolutions; the Keras U-Net has "
                              f"{DEPTH - 1} (deconvolution=True) or none (UpSampling3D)")
    first = convs[0].get("kernel", 0)
    in_channels, width = first.shape[3], first.shape[4]

    params: dict = {}
    stats: dict = {}

    def block(i: int, module: tuple[str, ...], cin: int, cout: int) -> None:
        _set(params, module + ("conv1",), _conv(path, convs[i], (3, 3, 3, cin, cout)))
        scale_bias, mean_var = _bn(path, bns[i], cout, epsilons.get(bns[i].name, KERAS_BN_EPSILON))
        _set(params, module + ("bn1",), scale_bias)
        _set(stats, module + ("bn1",), mean_var)

    cin = in_channels
    for i in range(ENCODER_CONVS):
        level, second = divmod(i, 2)
        cout = width * 2 ** (level + second)
        block(i, (f"down_tr{64 * 2**level}", f"ops_{second}"), cin, cout)
        cin = cout
    if finals:
        for j, level in enumerate(reversed(range(DEPTH - 1))):
            up, out = width * 2 ** (level + 2), width * 2 ** (level + 1)
            name = f"up_tr{64 * 2**level}"
            if ups:
                _set(params, (name, "up_conv"), _conv(path, ups[j], (2, 2, 2, up, up), transposed=True))
            else:  # UpSampling3D: every input voxel copied to its 2x2x2 block
                kernel = np.broadcast_to(np.eye(up, dtype=np.float32), (2, 2, 2, up, up)).copy()
                _set(params, (name, "up_conv"), {"kernel": kernel, "bias": np.zeros(up, np.float32)})
            block(ENCODER_CONVS + 2 * j, (name, "ops_0"), up + out, out)
            block(ENCODER_CONVS + 2 * j + 1, (name, "ops_1"), out, out)
        final = finals[0]
        n_labels = final.get("kernel", 0).shape[-1]
        _set(params, ("out_tr", "final_conv"), _conv(path, final, (1, 1, 1, 2 * width, n_labels)))
    used = ENCODER_CONVS + (DECODER_CONVS if finals else 0)
    dropped = [layer.name for layer in convs[used:] + bns[used:] + kinds["dense"]]
    if dropped:
        log.warning(
            "%s: not converted: %s (%s; it has no counterpart in our models)", path, ", ".join(dropped),
            "the TransVW head: conv, BN, Dense, Dense" if finals else "a classifier on the Keras encoder",
        )
    return {"params": params, "batch_stats": stats}


def load(path: str | os.PathLike) -> Variables:
    """Read a Keras `.h5` weight file of Models Genesis / TransVW into Flax variables.

    Args:
      path: a whole-model save or a `save_weights` file (Keras 2 / tf.keras HDF5).

    Returns:
      {'params', 'batch_stats'} of float32 numpy arrays under our module names: UNet3D's
      (a U-Net or TransVW file; TransVW's head is not converted, see the module doc) or
      the encoder's (`down_tr*`, an encoder-only file). BatchNorm variances carry the
      epsilon difference (see the module doc).

    Raises:
      CheckpointError with one line naming the file: missing h5py, not HDF5, not a Keras
      weight file, no Conv3D layers, or a layer whose shape does not fit the U-Net.
    """
    path = Path(path)
    layers, epsilons = _read_layers(path)
    if not layers:
        raise CheckpointError(f"{path}: a Keras weight file without weights (no Conv3D layers)")
    return _to_variables(path, layers, epsilons)
