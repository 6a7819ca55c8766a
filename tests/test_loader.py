"""Grain pipelines: determinism, exact resume, process-count-independent global batches,
validation padding."""

import numpy as np
import pytest

from transvw_jax.data import loader, store

SHAPE = (4, 4, 2)


class _Indexed:
    """A source whose cube i is filled with i, so batches reveal which elements they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"cube": np.full(SHAPE, i, np.uint16), "label": np.int32(i % 3)}


def _ids(batch):
    return batch["cube"][:, 0, 0, 0].astype(int).tolist()


def _take(ds, n):
    it = iter(ds)
    return [_ids(next(it)) for _ in range(n)]


def test_batches_have_fixed_shape_and_labels_match_cubes():
    it = iter(loader.train_dataset(_Indexed(10), batch_size=4, seed=0, process_index=0, process_count=1))
    for _ in range(6):  # crosses epoch boundaries
        b = next(it)
        assert b["cube"].shape == (4,) + SHAPE and b["cube"].dtype == np.uint16
        assert b["label"].dtype == np.int32
        np.testing.assert_array_equal(b["label"], b["cube"][:, 0, 0, 0] % 3)


def test_same_seed_same_order_and_each_epoch_a_new_permutation():
    ds = lambda seed: loader.train_dataset(_Indexed(12), batch_size=4, seed=seed, process_index=0,  # noqa: E731
                                           process_count=1)
    a = _take(ds(1), 6)
    assert a == _take(ds(1), 6)
    assert a != _take(ds(2), 6)
    epoch1, epoch2 = sum(a[:3], []), sum(a[3:], [])
    assert sorted(epoch1) == sorted(epoch2) == list(range(12))
    assert epoch1 != epoch2


def test_finite_epochs_drop_the_remainder():
    ds = loader.train_dataset(_Indexed(10), batch_size=4, seed=0, num_epochs=1, process_index=0,
                              process_count=1)
    batches = [_ids(b) for b in ds]
    assert len(batches) == 2 and len(set(sum(batches, []))) == 8


def test_restored_iterator_state_continues_exactly():
    ds = loader.train_dataset(_Indexed(23), batch_size=5, seed=3, process_index=0, process_count=1)
    it = iter(ds)
    for _ in range(7):  # mid-way through the second epoch
        next(it)
    state = it.get_state()
    expected = [_ids(next(it)) for _ in range(6)]
    fresh = iter(loader.train_dataset(_Indexed(23), batch_size=5, seed=3, process_index=0, process_count=1))
    fresh.set_state(state)
    assert [_ids(next(fresh)) for _ in range(6)] == expected


def _global_batches(n, global_batch, count, steps, seed=7):
    """The global batches of `steps` steps as `parallel.global_batch` assembles them: process
    0's rows, then process 1's, ..."""
    its = [iter(loader.train_dataset(_Indexed(n), batch_size=global_batch // count, seed=seed,
                                     process_index=i, process_count=count)) for i in range(count)]
    return [sum((_ids(next(it)) for it in its), []) for _ in range(steps)]


@pytest.mark.parametrize("n,global_batch,count", [(24, 4, 4), (26, 4, 2), (9, 2, 2), (12, 6, 3)])
def test_processes_rows_are_disjoint_and_cover_every_epoch_once(n, global_batch, count):
    steps = -(-2 * n // global_batch)  # two epochs (and a bit, when B does not divide N)
    batches = _global_batches(n, global_batch, count, steps)
    for batch in batches:
        assert len(set(batch)) == global_batch  # no cube on two processes in one step
    stream = sum(batches, [])
    for epoch in range(2):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n)), epoch
    assert stream[:n] != stream[n:2 * n]  # reshuffled


def test_global_batches_do_not_depend_on_the_process_count():
    one = _global_batches(24, 8, 1, 7)  # 7 steps: straddles the epoch boundary at cube 24
    assert _global_batches(24, 8, 2, 7) == one
    assert _global_batches(24, 8, 4, 7) == one
    assert _global_batches(24, 8, 4, 7, seed=8) != one


def test_straddling_batches_follow_the_stream():
    """B = 4 over 10 cubes: batch 2 holds the last 2 cubes of epoch 0 and the first 2 of epoch 1."""
    stream = sum(_global_batches(10, 1, 1, 20), [])
    assert sum(_global_batches(10, 4, 2, 5), []) == stream


def test_validation_is_ordered_padded_and_masked():
    batches = list(loader.eval_dataset(_Indexed(10), batch_size=4, process_index=0, process_count=1))
    assert [b["cube"].shape[0] for b in batches] == [4, 4, 4]
    assert _ids(batches[0]) == [0, 1, 2, 3]
    assert batches[2]["mask"].tolist() == [True, True, False, False]
    assert _ids(batches[2])[:2] == [8, 9]


def test_validation_shards_cover_every_cube_once_with_equal_batch_counts():
    shares = [list(loader.eval_dataset(_Indexed(11), batch_size=2, process_index=i, process_count=3))
              for i in range(3)]
    assert len({len(s) for s in shares}) == 1
    real = [i for s in shares for b in s for i, m in zip(_ids(b), b["mask"], strict=True) if m]
    assert sorted(real) == list(range(11))


class _SortedByClass(_Indexed):
    """Cube i of class i // 8 (5 classes of 8 cubes): the order a store lists them in."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "label": np.int32(i // 8)}


@pytest.mark.parametrize("count", [1, 2])
def test_shuffled_validation_mixes_classes_in_a_fixed_order(count):
    source = _SortedByClass(40)

    def shares(seed):
        return [list(loader.eval_dataset(source, batch_size=8 // count, process_index=i, process_count=count,
                                          shuffle_seed=seed)) for i in range(count)]

    first = shares(0)
    for step in range(len(first[0])):  # the global batch: every process's rows of this step
        labels = np.concatenate([s[step]["label"] for s in first])
        assert len(set(labels.tolist())) > 1
    assert len({len(s) for s in first}) == 1
    real = [i for s in first for b in s for i, m in zip(_ids(b), b["mask"], strict=True) if m]
    assert sorted(real) == list(range(40))
    assert [[_ids(b) for b in s] for s in shares(0)] == [[_ids(b) for b in s] for s in first]
    assert [[_ids(b) for b in s] for s in shares(1)] != [[_ids(b) for b in s] for s in first]


def test_bad_batch_sizes_are_explained():
    with pytest.raises(ValueError, match="batch_size 11 must be in"):
        loader.train_dataset(_Indexed(10), batch_size=11, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="processes"):
        loader.train_dataset(_Indexed(2), batch_size=1, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="batch_size 3 must be in .* global batch of 12"):
        loader.train_dataset(_Indexed(10), batch_size=3, seed=0, process_index=1, process_count=4)
    with pytest.raises(ValueError, match="global batch 8 is not batch_size 3 x 2 processes"):
        loader.train_dataset(_Indexed(10), batch_size=3, seed=0, process_index=0, process_count=2,
                             global_batch_size=8)


def test_store_source_through_the_loader(tmp_path):
    cubes = np.random.default_rng(0).random((6,) + SHAPE, dtype=np.float32)
    with store.StoreWriter(tmp_path / "s", cube_shape=SHAPE, records_per_shard=4) as w:
        for i, c in enumerate(cubes):
            w.add("train", c, i)
        w.commit(num_classes=6)
    src = store.open_store(tmp_path / "s").source("train")
    (batch,) = list(loader.train_dataset(src, batch_size=6, seed=0, num_epochs=1, process_index=0,
                                         process_count=1))
    for cube, label in zip(batch["cube"], batch["label"], strict=True):
        np.testing.assert_allclose(store.decode_cubes(cube), cubes[label], atol=1e-5)
