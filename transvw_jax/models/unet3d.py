"""The 3D U-Net family of TransVW / Models Genesis: UNet3D, YNet3D, EncoderClassifier.

Module names follow the reference PyTorch attribute names (down_tr64, ops_0/conv1, bn1,
up_tr256/up_conv, out_tr/final_conv, clc_out/fc1, ...), so that `export.py` maps every
parameter onto its state_dict key mechanically, and so that the three models share the
names of the parts they have in common: an encoder or a YNet3D checkpoint drops into any
of them.

Channel counts scale with `width` (32 in the reference): the encoder at depth d has
width*2^d -> width*2^(d+1) channels, the bottleneck 16*width, the class head 32*width.
Inputs are (B, X, Y, Z, C) with X, Y, Z divisible by 8 (three 2x poolings). Every model
takes an optional `mask` (B,) bool: the rows that enter BatchNorm's batch statistics
(`layers.BatchNorm`; evaluation passes the mask of its padded batches), None = all rows.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transvw_jax.models.layers import (
    BatchNorm,
    Conv3D,
    ConvTranspose2x,
    Dense,
    max_pool_2x,
)

Dtype = Any
DEPTHS = 4


class LUConv(nn.Module):
    """Conv3d k=3 (bias) -> BatchNorm -> ReLU."""

    features: int
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = Conv3D(self.features, 3, dtype=self.dtype, impl=self.conv_impl, name="conv1")(x)
        x = BatchNorm(mode=self.bn, dtype=self.dtype, name="bn1")(x, train, mask)
        return nn.relu(x)


class DownTransition(nn.Module):
    """Two LUConvs, named ops_0 and ops_1 like the reference nn.Sequential `ops`.

    The 2x2x2 max-pool that follows (at depths 0-2) has no parameters and is applied by
    the encoder, which also keeps the pre-pool output as the skip connection.
    """

    features: tuple[int, int]
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        for i, f in enumerate(self.features):
            x = LUConv(f, self.bn, self.dtype, self.conv_impl, name=f"ops_{i}")(x, train, mask)
        return x


def _check_input(x: jax.Array) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected input of shape (B, X, Y, Z, C), got shape {x.shape}")
    if any(s % 8 for s in x.shape[1:4]):
        raise ValueError(
            f"spatial size {x.shape[1:4]} must be divisible by 8 (three 2x poolings)"
        )


def _encoder(x: jax.Array, width: int, bn: str, dtype: Dtype, train: bool, conv_impl: str = "xla3d",
             mask: jax.Array | None = None):
    """The four down transitions. Must be called inside a compact method: the blocks
    attach to the calling module under the reference names (down_tr64 ... down_tr512).

    Returns the bottleneck (16*width channels at 1/8 resolution) and the three skips.
    `mask` (B,) bool: the rows that enter BatchNorm's batch statistics (None: all).
    """
    skips = []
    for d in range(DEPTHS):
        c = width * 2**d
        # The reference names blocks by their output channels at width 32.
        x = DownTransition((c, 2 * c), bn, dtype, conv_impl, name=f"down_tr{64 * 2**d}")(x, train, mask)
        if d < DEPTHS - 1:
            skips.append(x)
            x = max_pool_2x(x)
    return x, skips


def _decoder(x: jax.Array, skips: list, width: int, bn: str, dtype: Dtype, train: bool,
             conv_impl: str = "xla3d", mask: jax.Array | None = None):
    for d in reversed(range(DEPTHS - 1)):
        # From below come width*2^(d+2) channels (512, 256, 128 at width 32); the block
        # returns width*2^(d+1). Reference names: up_tr256, up_tr128, up_tr64.
        up, out = width * 2 ** (d + 2), width * 2 ** (d + 1)
        block = UpTransition(up, out, bn, dtype, conv_impl, name=f"up_tr{64 * 2**d}")
        x = block(x, skips[d], train, mask)
    return x


class UpTransition(nn.Module):
    """ConvTranspose (k=2, s=2) -> concat [upsampled, skip] -> two LUConvs (ops_0, ops_1)."""

    up_features: int
    features: int
    bn: str
    dtype: Dtype
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array, train: bool,
                 mask: jax.Array | None = None) -> jax.Array:
        x = ConvTranspose2x(self.up_features, dtype=self.dtype, name="up_conv")(x)
        x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
        for i in range(2):
            x = LUConv(self.features, self.bn, self.dtype, self.conv_impl, name=f"ops_{i}")(x, train, mask)
        return x


class ClassificationHead(nn.Module):
    """Conv3d k=3 (32*width) -> BatchNorm -> ReLU -> global average pool -> Linear.

    Returns logits (the reference applies softmax inside the model; here the loss takes
    logits and uses log_softmax, which is stable where log(softmax) is not).
    """

    num_classes: int
    width: int = 32
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = Conv3D(32 * self.width, 3, dtype=self.dtype, impl=self.conv_impl, name="conv1")(x)
        x = BatchNorm(mode=self.bn, dtype=self.dtype, name="bn1")(x, train, mask)
        x = nn.relu(x)
        x = x.astype(jnp.float32).mean(axis=(1, 2, 3))
        return Dense(self.num_classes, dtype=self.dtype, name="fc1")(x).astype(jnp.float32)


class UNet3D(nn.Module):
    """The Models Genesis 3D U-Net: returns the sigmoid restoration (B, X, Y, Z, out).

    `activation="none"` returns the logits instead (segmentation fine-tuning takes a
    softmax over classes); the parameters are the same either way.
    """

    out_channels: int = 1
    width: int = 32
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla3d"
    activation: str = "sigmoid"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        _check_input(x)
        x, skips = _encoder(x, self.width, self.bn, self.dtype, train, self.conv_impl, mask)
        x = _decoder(x, skips, self.width, self.bn, self.dtype, train, self.conv_impl, mask)
        return OutputTransition(self.out_channels, self.dtype, self.activation, name="out_tr")(x)


class OutputTransition(nn.Module):
    """Conv3d k=1 -> sigmoid (or nothing: logits), in float32."""

    out_channels: int
    dtype: Dtype
    activation: str = "sigmoid"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = Conv3D(self.out_channels, 1, dtype=self.dtype, name="final_conv")(x).astype(jnp.float32)
        return nn.sigmoid(y) if self.activation == "sigmoid" else y


class YNet3D(nn.Module):
    """TransVW's network: the U-Net plus the visual-word head on the bottleneck.

    Returns (restoration, logits): restoration (B, X, Y, Z, 1) in [0, 1], logits
    (B, num_classes) before softmax, both float32.
    """

    num_classes: int
    width: int = 32
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    out_channels: int = 1
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool,
                 mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        _check_input(x)
        bottleneck, skips = _encoder(x, self.width, self.bn, self.dtype, train, self.conv_impl, mask)
        y = _decoder(bottleneck, skips, self.width, self.bn, self.dtype, train, self.conv_impl, mask)
        restoration = OutputTransition(self.out_channels, self.dtype, name="out_tr")(y)
        head = ClassificationHead(self.num_classes, self.width, self.bn, self.dtype, self.conv_impl,
                                  name="clc_out")
        return restoration, head(bottleneck, train, mask)


class EncoderClassifier(nn.Module):
    """Encoder + the TransVW class head (conv, BN, ReLU, global average pool, dense).

    Its parameters carry the same names as YNet3D's encoder and head, so a pretrained
    YNet3D (or just its encoder) loads into it for downstream classification. Returns
    logits (B, num_classes), float32.
    """

    num_classes: int
    width: int = 32
    bn: str = "reference"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        _check_input(x)
        bottleneck, _ = _encoder(x, self.width, self.bn, self.dtype, train, self.conv_impl, mask)
        head = ClassificationHead(self.num_classes, self.width, self.bn, self.dtype, self.conv_impl,
                                  name="clc_out")
        return head(bottleneck, train, mask)
