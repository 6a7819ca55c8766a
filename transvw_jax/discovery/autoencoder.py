"""Self-discovery, part 1: an auto-encoder on whole volumes and one embedding per patient.

TransVW embeds each patient with a 3D U-Net trained to reproduce whole volumes resized to
a fixed size (128 x 128 x 64 in the reference; MSE, Adam 1e-3); the embedding is the
global average pool of the bottleneck (16 * width channels: 512 at width 32). Nearest
patients in that space share anatomy, which is what makes a coordinate comparable between
them.

Memory stays bounded by one full-size volume: the resized volumes are written once, one
patient at a time, into a memory-mapped cache (`resized.npy`, float16: 2 bytes per voxel,
4 MiB per patient at 128 x 128 x 64), and training and embedding read batches from it.

The U-Net uses `bn="standard"` here: running statistics at eval time make a patient's
embedding independent of which other patients share its batch.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from transvw_jax import checkpointing
from transvw_jax.data.resize import resize_linear
from transvw_jax.errors import DataError
from transvw_jax.models import UNet3D, init_variables
from transvw_jax.models.unet3d import _encoder
from transvw_jax.progress import Progress


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.size = (128, 128, 64)  # volumes are resized to this (each divisible by 8)
    c.width = 32  # U-Net width; embeddings have 16 * width dimensions
    c.steps = 2000
    c.batch_size = 4
    c.learning_rate = 1e-3
    c.seed = 0
    return c


def build_cache(files: Sequence[Path], load: Callable[[Path], np.ndarray], size: Sequence[int],
                path: Path) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
    """Resize each usable volume to `size` into a memory-mapped float16 array at `path`.

    This is also the directory scan: a file whose `load` raises DataError is skipped and
    reported (one pass over the data instead of two).

    Returns:
      (cache (P, X, Y, Z) memory-mapped, the P usable files in order, [(file, reason)] skipped)
    """
    size = tuple(int(s) for s in size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(files), *size))
    usable: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    progress = Progress("discover/scan+resize", len(files), "volumes")
    for f in files:
        try:
            cache[len(usable)] = resize_linear(load(f), size)
            usable.append(f)
        except DataError as e:
            reason = str(e).removeprefix(f"{f}: ")
            skipped.append((f, reason))
            logging.warning("skipping %s: %s", f, reason)
        progress.update()
    progress.done()
    if not usable:
        f, reason = skipped[0]
        raise DataError(f"{f.parent}: none of the {len(files)} volumes is usable; first: {f}: {reason}")
    cache.flush()
    if len(usable) < len(files):
        trimmed = np.lib.format.open_memmap(path.with_name(f".{path.name}.{os.getpid()}.trim.npy"), mode="w+",
                                            dtype=np.float16, shape=(len(usable), *size))
        trimmed[:] = cache[:len(usable)]
        trimmed.flush()
        del cache
        os.replace(trimmed.filename, tmp)
        del trimmed
    else:
        del cache
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r"), usable, skipped


class _Encoder(nn.Module):
    """The U-Net's encoder alone, under the same parameter names as in UNet3D."""

    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bottleneck, _ = _encoder(x, self.width, "standard", jnp.float32, False)
        return bottleneck.astype(jnp.float32).mean(axis=(1, 2, 3))


def train_autoencoder(cache: np.ndarray, cfg: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Train (or reload) the auto-encoder on the resized volumes; returns its variables.

    The final variables are saved as an Orbax checkpoint under `workdir/checkpoints`; a
    later run with the same settings finds it and skips training.
    """
    model = UNet3D(width=cfg.width, bn="standard")
    key = jax.random.key(cfg.seed)
    variables = init_variables(model, key)
    restored = checkpointing.restore_variables(workdir, variables)
    if restored is not None and restored[0] == cfg.steps:
        logging.info("discover/autoencoder: reusing %s (step %d)", checkpointing.checkpoint_dir(workdir),
                     restored[0])
        return restored[1]

    tx = optax.adam(cfg.learning_rate)
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, stats, opt_state, x):
        x = x.astype(jnp.float32)[..., None]

        def loss_fn(p):
            y, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return jnp.mean((y - x) ** 2), upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    rng = np.random.default_rng(cfg.seed)
    batch = min(cfg.batch_size, len(cache))
    progress = Progress("discover/autoencoder", cfg.steps, "steps")
    for _ in range(cfg.steps):
        idx = np.sort(rng.choice(len(cache), size=batch, replace=False))
        params, stats, opt_state, loss = step(params, stats, opt_state, np.asarray(cache[idx]))
        progress.update(extra=f"mse {float(loss):.5f}")
    progress.done()
    variables = {"params": params, "batch_stats": stats}
    checkpointing.save(workdir, cfg.steps, variables, max_to_keep=1)
    return variables


def embed(cache: np.ndarray, variables: dict, width: int, batch_size: int = 4) -> np.ndarray:
    """(P, 16 * width) float32: the global average pool of each volume's bottleneck."""
    encoder = _Encoder(width=width)
    apply = jax.jit(lambda v, x: encoder.apply(v, x.astype(jnp.float32)[..., None]))
    out = []
    for start in range(0, len(cache), batch_size):
        chunk = np.asarray(cache[start:start + batch_size])
        n = len(chunk)
        if n < batch_size:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(apply(variables, chunk))[:n])
    return np.concatenate(out).astype(np.float32)
