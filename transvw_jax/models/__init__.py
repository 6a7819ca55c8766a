"""Flax 3D U-Net family with the reference TransVW / Models Genesis parameter layout."""

from transvw_jax.models.factory import abstract_variables, build_model, init_variables
from transvw_jax.models.unet3d import EncoderClassifier, UNet3D, YNet3D

__all__ = ["EncoderClassifier", "UNet3D", "YNet3D", "abstract_variables", "build_model", "init_variables"]
