"""Per-process data state: each process saves and restores its own iterator state, and a
restart with another process count (or global batch) re-shards at the same global cube.

Processes are simulated by passing process_index / process_count to the loader; the
checkpoint tests run RunCheckpointer in this one process and build what a two-process run
leaves on disk (its JSON item and its two per-process files) by hand.
"""

import json
import logging
import shutil

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from transvw_jax import checkpointing
from transvw_jax.data import loader
from transvw_jax.errors import CheckpointError

N, SEED = 22, 5  # 22 cubes: global batches of 4, 6 or 8 straddle epochs


class _Indexed:
    """Cube i is filled with i, so a batch tells which stream elements it holds."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"cube": np.full((2, 2, 2), i, np.uint16), "label": np.int32(i % 3)}


def _iterators(global_batch, count):
    return [iter(loader.train_dataset(_Indexed(), batch_size=global_batch // count, seed=SEED,
                                      global_batch_size=global_batch, process_index=i, process_count=count))
            for i in range(count)]


def _ids(batch):
    return batch["cube"][:, 0, 0, 0].astype(int).tolist()


def _global(iterators, steps):
    """`steps` global batches, rows in process order (as parallel.global_batch assembles them)."""
    return [sum((_ids(next(it)) for it in iterators), []) for _ in range(steps)]


def _reference(global_batch, steps, skip=0):
    """Global batches skip .. skip+steps of one uninterrupted single-process run."""
    (it,) = _iterators(global_batch, 1)
    return _global([it], skip + steps)[skip:]


# --------------------------------------------------------------------------- loader level


def test_two_processes_restore_their_own_states_exactly():
    its = _iterators(8, 2)
    _global(its, 5)
    states = [it.get_state() for it in its]
    assert [s["process_index"] for s in states] == [0, 1]
    assert {s["position"] for s in states} == {40}
    expected = _global(its, 6)
    fresh = _iterators(8, 2)
    for it, s in zip(fresh, states, strict=True):
        it.set_state(s)
    assert _global(fresh, 6) == expected


@pytest.mark.parametrize("count", [1, 4])
def test_resharding_from_two_processes_continues_the_single_process_run(count):
    its = _iterators(8, 2)
    _global(its, 5)
    state = its[1].get_state()  # any process's state: the position is global
    resumed = _iterators(8, count)
    for it in resumed:
        it.set_state(state)
    assert _global(resumed, 6) == _reference(8, 6, skip=5)


def test_a_new_global_batch_resumes_at_the_same_cube():
    its = _iterators(6, 2)
    _global(its, 3)  # position 18: not a whole number of batches of 4
    resumed = _iterators(4, 2)
    for it in resumed:
        it.seek(its[0].position)
    stream = sum(_reference(1, 18 + 16), [])
    assert sum(_global(resumed, 4), []) == stream[18:34]


def test_seek_drops_batches_already_prefetched():
    (it,) = _iterators(4, 1)
    first = _global([it], 3)
    it.seek(0)
    assert _global([it], 3) == first
    it.seek(4)
    assert _global([it], 2) == first[1:]


# --------------------------------------------------------------------------- checkpoint level

VARIABLES = {"params": {"w": jnp.arange(3.0)}, "batch_stats": {"mean": jnp.zeros(2)}}
TRAIN_STATE = {"step": jnp.int32(0)}


def _save(workdir, step, iterator, data_state=None):
    ckpt = checkpointing.RunCheckpointer(workdir)
    try:
        ckpt.save(step, VARIABLES, TRAIN_STATE, data_state or {"best_eval": None, "evals_since_best": 2},
                  iterator=iterator)
    finally:
        ckpt.wait()
        ckpt.close()


def _restore(workdir, step, iterator):
    ckpt = checkpointing.RunCheckpointer(workdir)
    try:
        return ckpt.restore(step, VARIABLES, TRAIN_STATE, iterator=iterator)
    finally:
        ckpt.close()


def _fake_two_process_checkpoint(workdir, step, global_batch):
    """Step `step` as a 2-process run records it in process 0's JSON: 2 processes. (Its
    per-process rows are not read when the process count differs, so the 1-process rows
    written here stand in for them.)"""
    its = _iterators(global_batch, 1)
    _global(its, step)
    _save(workdir, step, its[0])
    meta = workdir / "checkpoints" / str(step) / "data" / "metadata"
    data = json.loads(meta.read_text())
    assert data["num_processes"] == 1 and data["position"] == step * global_batch
    meta.write_text(json.dumps({**data, "num_processes": 2}))


def test_each_process_writes_its_own_iterator_state_and_restores_it(tmp_path):
    (it,) = _iterators(8, 1)
    _global([it], 4)
    ckpt = checkpointing.RunCheckpointer(tmp_path)
    ckpt.save(4, VARIABLES, TRAIN_STATE, {"best_eval": None, "evals_since_best": 2}, iterator=it)
    expected = _global([it], 5)  # advancing now does not change what step 4 holds
    ckpt.wait()
    ckpt.close()
    step_dir = tmp_path / "checkpoints" / "4"
    assert (step_dir / "iterator").is_dir()
    (fresh,) = _iterators(8, 1)
    _, _, data_state = _restore(tmp_path, 4, fresh)
    assert data_state["evals_since_best"] == 2
    recorded = data_state["position"], data_state["num_processes"], data_state["global_batch_size"]
    assert recorded == (32, 1, 8)
    assert _global([fresh], 5) == expected


@pytest.mark.parametrize("global_batch", [8, 6])
def test_a_two_process_checkpoint_re_shards_in_one_process(tmp_path, caplog, global_batch):
    _fake_two_process_checkpoint(tmp_path, 3, global_batch)
    (it,) = _iterators(8, 1)
    with caplog.at_level(logging.INFO):
        _restore(tmp_path, 3, it)
    position = 3 * global_batch
    line = "data: checkpoint written by 2 processes, now 1: re-sharded at global cube 24"
    if global_batch != 8:
        line = ("data: checkpoint written by 2 processes, now 1, with global batch 6, now 8: re-sharded at "
                "global cube 18")
    assert line in caplog.messages
    stream = sum(_reference(1, position + 40), [])
    assert sum(_global([it], 5), []) == stream[position:position + 40]


def test_a_disagreeing_or_missing_process_state_stops_naming_the_step(tmp_path):
    (it,) = _iterators(8, 1)
    _global([it], 2)
    _save(tmp_path, 2, it)
    meta = tmp_path / "checkpoints" / "2" / "data" / "metadata"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "position": 8}))
    disagrees = r"checkpoints/2: process 0's data state .*16.* disagrees .* cube 8,"
    with pytest.raises(CheckpointError, match=disagrees):
        _restore(tmp_path, 2, _iterators(8, 1)[0])
    shutil.rmtree(tmp_path / "checkpoints" / "2" / "iterator")
    with pytest.raises(CheckpointError, match=r"checkpoints/2: no readable data state for process 0 of 1"):
        _restore(tmp_path, 2, _iterators(8, 1)[0])


def test_an_older_checkpoint_resumes_at_step_times_batch(tmp_path, caplog):
    """Written before per-process states: process 0's Grain state in the JSON item only. For a
    single-process run this is the same cube as the old pipeline (shuffle, slice [0::1],
    repeat, batch) would read next, so such runs resume exactly."""
    _save(tmp_path, 3, None, {"iterator": {"next_index": 3}, "best_eval": None, "evals_since_best": 0})
    (it,) = _iterators(4, 1)
    with caplog.at_level(logging.WARNING):
        _restore(tmp_path, 3, it)
    assert it.position == 12 and any("no recorded data position" in m for m in caplog.messages)
    old = grain.MapDataset.source(_Indexed()).shuffle(seed=SEED)[0::1].repeat().batch(4)
    assert _global([it], 6) == [_ids(old[k]) for k in range(3, 9)]
