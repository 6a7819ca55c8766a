"""Grain pipelines from a random-access cube source to fixed-shape host batches.

Training: source -> global shuffle (seeded; reshuffled every epoch) -> this process's
slice -> repeat -> batch (drop remainder) -> parallel reads with prefetch. Every process
shuffles with the same seed and keeps elements `process_index::process_count` of each
epoch, so within an epoch the processes' shards are disjoint and together complete, and
no process needs to know another's position. The iterator's state (`get_state` /
`set_state`, a few integers) goes into the checkpoint, so a resumed run continues with
exactly the batch it would have read next.

Validation: no shuffle, one pass; the last batch is padded to the full batch size and a
boolean `mask` says which rows are real, so the eval step compiles once.

Batches are dicts of numpy arrays: `cube` (B, X, Y, Z) in the source's dtype (uint16 from a
store; decode on the device with `store.decode_cubes`), `label` (B,) int32, and in
validation `mask` (B,) bool.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

# Reads are a pread plus numpy views: threads suffice (no GIL-bound decoding). More threads
# than cores only add contention when the store is in the page cache (benchmarks/loader.py:
# 8.6k cubes/s with 2 threads vs 3.7k with 8 on 2 cores).
DEFAULT_THREADS = min(8, os.cpu_count() or 1)
DEFAULT_PREFETCH = 8  # batches read ahead (Grain counts elements after batching)


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _stack(elements: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch dicts into one preallocated array per key (one copy per cube)."""
    first = elements[0]
    out = {}
    for key, value in first.items():
        value = np.asarray(value)
        batch = np.empty((len(elements),) + value.shape, value.dtype)
        for i, e in enumerate(elements):
            batch[i] = e[key]
        out[key] = batch
    return out


def train_dataset(source: Any, *, batch_size: int, seed: int, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  num_threads: int = DEFAULT_THREADS, prefetch: int = DEFAULT_PREFETCH) -> grain.IterDataset:
    """Shuffled, per-process, fixed-shape training batches.

    Args:
      source: random access (`__len__`, `__getitem__` -> {"cube", "label"}), e.g.
        `open_store(path).source("train")` or `ReleasedSource(...)`.
      batch_size: cubes per batch on THIS process (global batch / process count).
      seed: shuffle seed, the same on every process.
      num_epochs: None repeats forever (the train loop counts steps).
      process_index, process_count: default to `jax.process_index()` / `jax.process_count()`.
      num_threads, prefetch: parallel reads, and the read-ahead buffer in batches.
    """
    index, count = _process_shard(process_index, process_count)
    if len(source) < count:
        raise ValueError(f"{len(source)} cubes cannot be shared by {count} processes")
    per_process = len(source) // count
    if batch_size < 1 or batch_size > per_process:
        raise ValueError(f"batch_size {batch_size} must be in [1, {per_process}] "
                         f"({len(source)} cubes over {count} processes)")
    ds = grain.MapDataset.source(source).shuffle(seed=seed)[index::count]
    ds = ds.repeat(num_epochs).batch(batch_size, drop_remainder=True, batch_fn=_stack)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


class _PaddedShard:
    """This process's validation share, padded so that every process has the same length.

    Element j is source cube `index + j * count`; past the end it repeats cube 0 with
    `mask` False. Equal lengths keep multi-process eval steps in lockstep.
    """

    def __init__(self, source: Any, index: int, count: int, batch_size: int):
        self._source, self._index, self._count = source, index, count
        per_process = -(-len(source) // count)
        self._len = -(-per_process // batch_size) * batch_size

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        i = self._index + j * self._count
        real = i < len(self._source)
        element = dict(self._source[i if real else 0])
        element["mask"] = np.bool_(real)
        return element


def eval_dataset(source: Any, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = DEFAULT_THREADS,
                 prefetch: int = DEFAULT_PREFETCH) -> grain.IterDataset:
    """One ordered pass over this process's share, in full batches with a `mask` of real rows.

    Every process gets the same number of batches, however the cubes divide.
    """
    index, count = _process_shard(process_index, process_count)
    if len(source) == 0:
        raise ValueError("no validation cubes")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(_PaddedShard(source, index, count, batch_size))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
