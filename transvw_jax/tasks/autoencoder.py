"""The discovery auto-encoder: a 3D U-Net that reproduces whole resized volumes (MSE).

Its bottleneck's global average pool embeds each patient (`discovery.autoencoder.embed`);
nearest patients in that space share anatomy. `bn="standard"`: running statistics at
evaluation make a patient's embedding independent of the other patients in its batch.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from transvw_jax import losses, parallel, training
from transvw_jax.data import store
from transvw_jax.models import build_model


def make_model(model: ml_collections.ConfigDict, width: int):
    """UNet3D of `width` with the configured convolution and compute dtype."""
    return build_model({"name": "unet3d", "width": width, "bn": "standard",
                        "dtype": model.get("dtype", "float32"), "conv_impl": model.get("conv_impl", "auto")})


class ResizedVolumes:
    """The resized-volume cache as a random-access training source ({"cube": volume})."""

    def __init__(self, cache: np.ndarray):
        self._cache = cache

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"cube": np.asarray(self._cache[i])}


def make_task(model_config: ml_collections.ConfigDict, width: int, mesh) -> training.Task:
    model = make_model(model_config, width)
    batch_sh = parallel.batch_sharding(mesh)

    def prepare(batch, keys, train):
        return {"input": jax.lax.with_sharding_constraint(store.decode_cubes(batch["cube"]), batch_sh)}

    def loss(variables, inputs):
        x = inputs["input"][..., None]
        y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
        mse = losses.squared_error(y, x).mean()
        return mse, ({"mse": mse}, upd["batch_stats"])

    return training.Task(name="discover/autoencoder", model=model, prepare=prepare, loss=loss,
                         metric_names=("mse",))
