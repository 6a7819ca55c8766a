"""Grain pipelines from a random-access cube source to fixed-shape host batches.

Training: one global stream of cubes, `source -> shuffle(seed) -> repeat` (reshuffled every
epoch), cut into global batches of B consecutive stream elements; process p of P reads rows
[p*b, (p+1)*b) of each (b = B/P), which is the row order `parallel.global_batch` assembles
(process p's rows in process order). So the training order is a function of the global
position alone: the global batches, row for row, are the same for any process count, and
the position of a run is one number, the global cube K where its next batch starts.

Epochs: batches are cut from the stream, not from each epoch, so a batch may straddle two
epochs and no cube is dropped at an epoch's end (with `num_epochs`, only the last partial
global batch of the whole stream is dropped). Every epoch is still a complete permutation:
stream elements [e*N, (e+1)*N) hold every cube once.

Checkpoints: the iterator's state (`get_state` / `set_state`, Grain's protocol) is that
global position plus who read it; each process saves its own (`checkpointing.RunCheckpointer`
writes each process's state as that process's rows of an array). Because the order does not
depend on the sharding, a restart with another process count or another global batch size
resumes exactly at cube K (`TrainIterator.seek`); the iterator then rebuilds its Grain
prefetching pipeline from K, so parallel reads and read-ahead never see a stale position.

Validation: one pass; the last batch is padded to the full batch size and a boolean `mask`
says which rows are real, so the eval step compiles once. With `shuffle_seed` the pass
follows one fixed permutation of the cubes (the same at every evaluation): stores list their
cubes by class and patient, and in store order a batch would hold one class or one patient,
which changes the loss of a network that normalises with batch statistics (`bn="reference"`).

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
# than cores only add contention when the store is in the page cache (benchmarks/RESULTS.md).
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


class _ProcessRows(grain.MapDataset):
    """Process p's rows of the global batches that start at stream element `start`.

    Local element j is stream element `start + (j // b) * B + p * b + j % b`: random access,
    so Grain's prefetching iterator reads the rows in parallel as for any MapDataset.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, stream: grain.MapDataset, start: int, global_batch: int, local_batch: int,
                 process_index: int):
        super().__init__(stream)
        self._start, self._global, self._local, self._index = start, global_batch, local_batch, process_index
        self._len = max(0, (len(stream) - start) // global_batch) * local_batch

    def __len__(self) -> int:
        return self._len

    def _stream_index(self, j: int) -> int:
        if not 0 <= j < self._len:
            raise IndexError(f"row {j} of {self._len}")
        batch, row = divmod(j, self._local)
        return self._start + batch * self._global + self._index * self._local + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._stream_index(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self._stream_index(j) for j in indices])

    def __str__(self) -> str:
        return f"_ProcessRows(start={self._start}, B={self._global}, b={self._local}, p={self._index})"


class TrainIterator(grain.DatasetIterator):
    """This process's training batches from a global position, with a resharding-proof state.

    The state is `{"position": K, "global_batch_size": B, "process_index": p,
    "process_count": P}`, K being the global cube where the next batch starts. Only K is
    needed to resume (the order is a function of the global position alone); the other
    fields record who wrote it, so that a checkpoint can tell a same-sharding restore
    from a resharding one. `seek(K)` / `set_state` drop the Grain pipeline and build a new
    one from K on the next read, so no prefetched batch of the old position is returned.
    """

    def __init__(self, stream: grain.MapDataset, *, global_batch_size: int, batch_size: int,
                 process_index: int, process_count: int, read_options: grain.ReadOptions):
        super().__init__()
        self._stream, self._read_options = stream, read_options
        self.global_batch_size, self.batch_size = global_batch_size, batch_size
        self.process_index, self.process_count = process_index, process_count
        self._position = 0
        self._batches: grain.DatasetIterator | None = None  # built from _position on first use

    @property
    def position(self) -> int:
        """The global stream element (cube) where the next global batch starts."""
        return self._position

    def _pipeline(self) -> grain.DatasetIterator:
        if self._batches is None:
            rows = _ProcessRows(self._stream, self._position, self.global_batch_size, self.batch_size,
                                self.process_index)
            ds = rows.batch(self.batch_size, drop_remainder=True, batch_fn=_stack)
            self._batches = iter(ds.to_iter_dataset(self._read_options))
        return self._batches

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        batch = next(self._pipeline())
        self._position += self.global_batch_size
        return batch

    def seek(self, position: int) -> None:
        """Continue with the global batch that starts at stream element `position`."""
        position = int(position)
        if position < 0:
            raise ValueError(f"data position must be >= 0, got {position}")
        self._drop_pipeline()
        self._position = position

    def get_state(self) -> dict[str, int]:
        return {"position": self._position, "global_batch_size": self.global_batch_size,
                "process_index": self.process_index, "process_count": self.process_count}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at `state["position"]`, whichever process and process count wrote it."""
        self.seek(state["position"])

    def start_prefetch(self) -> None:
        self._pipeline().start_prefetch()

    def _drop_pipeline(self) -> None:
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def close(self) -> None:
        self._drop_pipeline()
        super().close()


class _TrainDataset(grain.IterDataset):
    """An IterDataset whose iterators are `TrainIterator`s starting at global cube 0."""

    def __init__(self, stream: grain.MapDataset, **iterator_args: Any):
        super().__init__()
        self._stream, self._iterator_args = stream, iterator_args

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self._stream, **self._iterator_args)


def train_dataset(source: Any, *, batch_size: int, seed: int, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  global_batch_size: int | None = None, num_threads: int = DEFAULT_THREADS,
                  prefetch: int = DEFAULT_PREFETCH) -> grain.IterDataset:
    """Shuffled, fixed-shape training batches: this process's rows of each global batch.

    Args:
      source: random access (`__len__`, `__getitem__` -> {"cube", "label"}), e.g.
        `open_store(path).source("train")` or `ReleasedSource(...)`.
      batch_size: cubes per batch on THIS process (global batch / process count).
      seed: shuffle seed, the same on every process.
      num_epochs: None repeats forever (the train loop counts steps).
      process_index, process_count: default to `jax.process_index()` / `jax.process_count()`.
      global_batch_size: cubes per step over all processes; defaults to
        batch_size * process_count (given, it must be exactly that).
      num_threads, prefetch: parallel reads, and the read-ahead buffer in batches.

    Returns:
      An IterDataset whose iterators are `TrainIterator`s (state = global position).
    """
    index, count = _process_shard(process_index, process_count)
    if global_batch_size is None:
        global_batch_size = batch_size * count
    if global_batch_size != batch_size * count:
        raise ValueError(f"global batch {global_batch_size} is not batch_size {batch_size} x {count} "
                         "processes")
    if len(source) < count:
        raise ValueError(f"{len(source)} cubes cannot be shared by {count} processes")
    if batch_size < 1 or global_batch_size > len(source):
        # A global batch larger than an epoch would hold some cube twice.
        raise ValueError(f"batch_size {batch_size} must be in [1, {len(source) // count}] "
                         f"({len(source)} cubes, a global batch of {global_batch_size} over {count} "
                         "processes)")
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return _TrainDataset(stream, global_batch_size=global_batch_size, batch_size=batch_size,
                         process_index=index, process_count=count, read_options=read_options)


class _PaddedShard:
    """This process's validation share, padded so that every process has the same length.

    Element j is cube `order[index + j * count]` (`order`: None = the source's order, or a
    permutation of it); past the end it repeats that order's first cube with `mask` False.
    Equal lengths keep multi-process eval steps in lockstep.
    """

    def __init__(self, source: Any, index: int, count: int, batch_size: int,
                 order: np.ndarray | None = None):
        self._source, self._index, self._count, self._order = source, index, count, order
        per_process = -(-len(source) // count)
        self._len = -(-per_process // batch_size) * batch_size

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> dict[str, np.ndarray]:
        i = self._index + j * self._count
        real = i < len(self._source)
        i = i if real else 0
        element = dict(self._source[int(self._order[i]) if self._order is not None else i])
        element["mask"] = np.bool_(real)
        return element


def eval_dataset(source: Any, *, batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, num_threads: int = DEFAULT_THREADS,
                 prefetch: int = DEFAULT_PREFETCH, shuffle_seed: int | None = None) -> grain.IterDataset:
    """One pass over this process's share, in full batches with a `mask` of real rows.

    Every process gets the same number of batches, however the cubes divide.

    shuffle_seed: None keeps the source's order; an int visits the cubes in one fixed
    permutation drawn from it (the same for every pass and every process), so that each
    batch mixes classes and patients while the pass stays repeatable.
    """
    index, count = _process_shard(process_index, process_count)
    if len(source) == 0:
        raise ValueError("no validation cubes")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = None if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(source))
    ds = grain.MapDataset.source(_PaddedShard(source, index, count, batch_size, order))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=_stack)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
