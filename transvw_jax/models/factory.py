"""Build a model from its config section and create its variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transvw_jax.errors import ConfigError
from transvw_jax.models.layers import BN_MODES
from transvw_jax.models.unet3d import EncoderClassifier, UNet3D, YNet3D

MODELS = {"unet3d": UNet3D, "ynet3d": YNet3D, "encoder_classifier": EncoderClassifier}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Create the module described by a `config.model` section.

    Keys: name (unet3d | ynet3d | encoder_classifier), width, bn (reference | standard),
    dtype (float32 | bfloat16), num_classes (ynet3d, encoder_classifier).

    Raises:
      ConfigError naming the offending `model.*` key.
    """
    name = cfg.get("name", "ynet3d")
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}; choose one of {sorted(MODELS)}")
    width = cfg.get("width", 32)
    if not isinstance(width, int) or width < 1:
        raise ConfigError(f"model.width must be a positive integer, got {width!r}")
    bn = cfg.get("bn", "reference")
    if bn not in BN_MODES:
        raise ConfigError(f"model.bn must be one of {list(BN_MODES)}, got {bn!r}")
    dtype_name = cfg.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    kwargs = dict(width=width, bn=bn, dtype=DTYPES[dtype_name])
    if name != "unet3d":
        num_classes = cfg.get("num_classes", 44)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"model.num_classes must be a positive integer, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    return MODELS[name](**kwargs)


def init_variables(model: nn.Module, key: jax.Array, in_channels: int = 1) -> dict:
    """Initialise `{'params', 'batch_stats'}` for `model`.

    Parameter shapes do not depend on the cube size, so the smallest valid input (8^3)
    is used: initialising the full-width model costs milliseconds instead of a forward
    pass over a 64x64x32 cube.
    """
    x = jnp.zeros((1, 8, 8, 8, in_channels), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(key)
    return dict(variables)
