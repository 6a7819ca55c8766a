"""Self-discovery, part 1: an auto-encoder on whole volumes and one embedding per patient.

TransVW embeds each patient with a 3D U-Net trained to reproduce whole volumes resized to
a fixed size (128 x 128 x 64 in the reference; MSE, Adam 1e-3); the embedding is the
global average pool of the bottleneck (16 * width channels: 512 at width 32). Nearest
patients in that space share anatomy, which is what makes a coordinate comparable between
them.

Memory stays bounded by one full-size volume: the resized volumes are written once, one
patient at a time, into a memory-mapped cache (`resized.npy`, float16: 2 bytes per voxel),
and training and embedding read batches from it. Training is the engine's
(`tasks.autoencoder` on `training.fit`): every process takes part, it resumes from its
checkpoints, and it uses the configured convolution.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transvw_jax import checkpointing, multihost, parallel, training
from transvw_jax.data.resize import resize_linear
from transvw_jax.errors import ConfigError, DataError
from transvw_jax.models import abstract_variables
from transvw_jax.models.unet3d import _encoder
from transvw_jax.progress import Progress
from transvw_jax.tasks import autoencoder as tasks_autoencoder


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
    dtype: Any = jnp.float32
    conv_impl: str = "xla3d"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bottleneck, _ = _encoder(x, self.width, "standard", self.dtype, False, self.conv_impl)
        return bottleneck.astype(jnp.float32).mean(axis=(1, 2, 3))


def loop_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training-loop keys `training.fit` reads, from `discovery.autoencoder`: Adam at
    a constant learning rate, no validation (the embedding is the product, not the loss)."""
    return ml_collections.ConfigDict({
        "batch_size": int(cfg.batch_size), "steps": int(cfg.steps), "seed": int(cfg.seed),
        "learning_rate": float(cfg.learning_rate), "optimizer": "adam", "schedule": "constant",
        "log_every": int(cfg.get("log_every", 10)), "checkpoint_every": int(cfg.get("checkpoint_every", 500)),
        "keep_checkpoints": int(cfg.get("keep_checkpoints", 1)), "patience": 0})


def mesh_for(batch_size: int, name: str = "discovery.autoencoder.batch_size"):
    """A data-parallel mesh of every process's first k devices, k the most that divide
    each process's share of `batch_size`: a batch of 4 volumes trains on 4 of 8 GPUs
    rather than failing, and every process takes part (so the loop's collectives,
    checkpoints and preemption work as in pretraining)."""
    count = jax.process_count()
    if batch_size % count:
        raise ConfigError(f"{name}={batch_size} must be a multiple of the {count} processes")
    share = batch_size // count
    k = max(d for d in range(1, min(jax.local_device_count(), share) + 1) if share % d == 0)
    devices = [d for p in range(count)
               for d in sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)[:k]]
    return parallel.make_mesh(1, devices)


def global_batch(batch_size: int, volumes: int) -> int:
    """`discovery.autoencoder.batch_size`, at most the number of volumes, rounded down to a
    multiple of the process count (every process reads the same share), at least one
    volume per process. Logged when it differs from the setting."""
    count = jax.process_count()
    if volumes < count:
        raise DataError(f"discover: {volumes} usable volumes cannot be shared by {count} processes; "
                        "run discovery with fewer processes (launch/slurm_discover.sbatch)")
    batch = min(batch_size, volumes)
    batch = max(count, batch - batch % count)
    if batch != batch_size:
        logging.info("discover/autoencoder: global batch %d (discovery.autoencoder.batch_size=%d, %d usable "
                     "volumes, %d processes)", batch, batch_size, volumes, count)
    return batch


def _weights_only_checkpoint(workdir: Path, model: ml_collections.ConfigDict,
                             cfg: ml_collections.ConfigDict) -> dict | None:
    """Versions before the training engine saved the finished auto-encoder as its weights
    alone (no optimiser or data state): reuse it when it has the configured step count;
    otherwise set it aside (the engine cannot resume from it) and train anew."""
    directory = checkpointing.checkpoint_dir(workdir)
    steps = sorted(int(c.name) for c in directory.iterdir() if c.name.isdigit()) if directory.is_dir() else []
    if not steps or (directory / str(steps[-1]) / checkpointing.TRAIN_STATE).is_dir():
        return None
    if steps[-1] == int(cfg.steps):
        like = abstract_variables(tasks_autoencoder.make_model(model, cfg.width))
        step, variables = checkpointing.restore_variables(workdir, like, step=steps[-1])
        logging.info("discover/autoencoder: reusing %s (step %d, weights only)", directory, step)
        return jax.tree.map(np.asarray, variables)
    aside = directory.with_name(f"{directory.name}.weights-only")

    def set_aside() -> None:
        logging.warning("discover/autoencoder: %s holds weights of step %d only, not a run to resume "
                        "to step %d: moved to %s, training anew", directory, steps[-1], cfg.steps, aside)
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(directory, aside)

    multihost.once_per_job("discover/autoencoder-set-aside", set_aside)
    return None


def train_autoencoder(cache: np.ndarray, cfg: ml_collections.ConfigDict, workdir: Path,
                      model: ml_collections.ConfigDict | None = None,
                      data: ml_collections.ConfigDict | None = None) -> dict:
    """Train the auto-encoder on the resized volumes in `workdir` (resuming from its latest
    checkpoint: a finished run is reused as it is); returns its variables as host arrays.

    Every process of the job calls this. `model`: the run's `config.model` (its conv_impl
    and dtype); `data`: its `config.data` (reader threads).
    """
    model = model if model is not None else ml_collections.ConfigDict({"conv_impl": "auto"})
    data = data if data is not None else ml_collections.ConfigDict()
    reused = _weights_only_checkpoint(workdir, model, cfg)
    if reused is not None:
        return reused
    t = loop_config(cfg)
    t.batch_size = global_batch(cfg.batch_size, len(cache))
    mesh = mesh_for(t.batch_size)
    task = tasks_autoencoder.make_task(model, cfg.width, mesh)
    run = training.place(task, training.make_optimizer(t), mesh)
    reader = ml_collections.ConfigDict({"num_threads": int(data.get("num_threads", 2)),
                                        "prefetch": int(data.get("prefetch", 4))})
    summary = training.fit(run, t, reader, workdir, train_source=tasks_autoencoder.ResizedVolumes(cache),
                           config_section="discovery.autoencoder")
    if summary.resumed_from == t.steps:
        logging.info("discover/autoencoder: reusing %s (step %d)", summary.checkpoint_dir, t.steps)
    # Replicated over the mesh (fsdp 1): any local shard is the whole array.
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), summary.variables)


def embed(cache: np.ndarray, variables: dict, width: int, batch_size: int = 4,
          model: ml_collections.ConfigDict | None = None) -> np.ndarray:
    """(P, 16 * width) float32: the global average pool of each volume's bottleneck, on this
    process's first device. `model`: the run's `config.model` (conv_impl, dtype)."""
    net = tasks_autoencoder.make_model(model if model is not None else ml_collections.ConfigDict(), width)
    encoder = _Encoder(width=width, dtype=net.dtype, conv_impl=net.conv_impl)
    apply = jax.jit(lambda v, x: encoder.apply(v, x.astype(jnp.float32)[..., None]))
    out = []
    for start in range(0, len(cache), batch_size):
        chunk = np.asarray(cache[start:start + batch_size])
        n = len(chunk)
        if n < batch_size:  # one compiled shape
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        out.append(np.asarray(apply(variables, chunk))[:n])
    return np.concatenate(out).astype(np.float32)
