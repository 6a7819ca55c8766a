"""Build a model from its config section and create its variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transvw_jax import native
from transvw_jax.errors import ConfigError
from transvw_jax.models.layers import default_conv_impl
from transvw_jax.models.unet3d import EncoderClassifier, UNet3D, YNet3D

MODELS = {"unet3d": UNet3D, "ynet3d": YNet3D, "encoder_classifier": EncoderClassifier}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _module_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The module's keyword arguments from a checked `config.model` section (missing keys
    take the defaults `configuration.validate_model` assumes)."""
    name = cfg.get("name", "ynet3d")
    kwargs = dict(width=cfg.get("width", 32), bn=cfg.get("bn", "reference"),
                  dtype=DTYPES[cfg.get("dtype", "float32")], conv_impl=cfg.get("conv_impl", "auto"))
    if name == "unet3d":
        kwargs.update(out_channels=cfg.get("out_channels", 1), activation=cfg.get("activation", "sigmoid"))
    else:
        kwargs["num_classes"] = cfg.get("num_classes", 44)
    return kwargs


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Create the module described by a `config.model` section.

    Keys: name (unet3d | ynet3d | encoder_classifier), width, bn (reference | standard),
    dtype (float32 | bfloat16), conv_impl (auto | xla3d | matmul | onednn),
    num_classes (ynet3d, encoder_classifier), out_channels and activation (unet3d:
    sigmoid | none). The command resolves "auto" once for the training mesh before any
    model is built (`transvw_jax.resolve`); a library caller that passes "auto" gets
    `layers.default_conv_impl()` for the current backend.

    Raises:
      ConfigError naming the offending `model.*` key.
    """
    # Imported here: configuration reads the layer constants of this package.
    from transvw_jax import configuration

    configuration.validate_model(cfg)
    kwargs = _module_kwargs(cfg)
    if kwargs["conv_impl"] == "auto":
        kwargs["conv_impl"] = default_conv_impl()
    elif kwargs["conv_impl"] == "onednn" and (reason := native.unavailable_reason()):
        raise ConfigError(f"model.conv_impl: 'onednn' cannot run here: {reason}")
    return MODELS[cfg.get("name", "ynet3d")](**kwargs)


def abstract_variables(model: nn.Module, in_channels: int = 1) -> dict:
    """Shapes and dtypes of `init_variables(model, ...)` (jax.ShapeDtypeStruct leaves),
    without computing anything: for checking checkpoints and counting parameters."""
    x = jax.ShapeDtypeStruct((1, 8, 8, 8, in_channels), jnp.float32)
    return dict(jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x))


def init_variables(model: nn.Module, key: jax.Array, in_channels: int = 1) -> dict:
    """Initialise `{'params', 'batch_stats'}` for `model`.

    Parameter shapes do not depend on the cube size, so the smallest valid input (8^3)
    is used. On CPU the init is compiled at XLA optimisation level 0: the ~50 threefry
    draws of the initialisers otherwise take ~10 s to compile on a 2-core machine (2 s
    at level 0), for a computation that runs once on a tiny input. The values can differ
    from an optimised compile in the last bit (seen: 1.5e-8); within this function they
    are deterministic for a given key.
    """
    x = jnp.zeros((1, 8, 8, 8, in_channels), jnp.float32)
    options = INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    init = jax.jit(lambda k: model.init(k, x, train=False), compiler_options=options)
    return dict(init(key))
