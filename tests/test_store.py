"""The visual-word store: round trips, precision, atomic commit, validation, released layout."""

import json

import numpy as np
import pytest

from transvw_jax.data import store
from transvw_jax.errors import DataError

SHAPE = (8, 8, 4)


def _cubes(n, seed=0):
    return np.random.default_rng(seed).random((n,) + SHAPE, dtype=np.float32)


def _write(path, n_train=7, n_val=3, dtype="uint16", records_per_shard=3):
    cubes = _cubes(n_train + n_val)
    with store.StoreWriter(path, cube_shape=SHAPE, dtype=dtype, records_per_shard=records_per_shard) as w:
        for i in range(n_train):
            w.add("train", cubes[i], i % 4, source=f"p{i % 2}.nii.gz", coord=(i, 2, 1), resolution=1 + i % 3)
        for i in range(n_val):
            w.add("validation", cubes[n_train + i], i, source="v.nii.gz", coord=(0, 0, i))
        w.commit(num_classes=4, config={"k": 1}, seeds={"discovery": 5})
    return cubes


@pytest.mark.parametrize("dtype,tolerance",
                         [("uint16", 0.5 / 65535), ("float16", 2.0 ** -12), ("float32", 0.0)])
def test_round_trip_within_the_documented_precision(tmp_path, dtype, tolerance):
    cubes = _write(tmp_path / "s", dtype=dtype)
    s = store.open_store(tmp_path / "s")
    assert s.cube_shape == SHAPE and s.dtype == dtype and s.num_classes == 4
    src = s.source("train")
    assert len(src) == 7 and s.num_cubes("validation") == 3
    for i in range(7):
        e = src[i]
        assert e["cube"].dtype == np.dtype(dtype) and int(e["label"]) == i % 4
        np.testing.assert_allclose(store.decode_cubes(e["cube"]), cubes[i], rtol=0, atol=tolerance * 1.0001)
    val = s.source("validation")
    np.testing.assert_allclose(store.decode_cubes(val[2]["cube"]), cubes[9], atol=tolerance * 1.0001)
    meta = s.manifest["splits"]["train"]["cubes"]
    assert meta["coord"][5] == [5, 2, 1] and meta["resolution"][5] == 3
    assert s.manifest["sources"][meta["source"][3]] == "p1.nii.gz"
    assert s.manifest["seeds"] == {"discovery": 5} and s.manifest["config"] == {"k": 1}
    assert len(s.manifest["splits"]["train"]["shards"]) == 3  # 7 records, 3 per shard
    np.testing.assert_array_equal(s.labels("train"), [i % 4 for i in range(7)])


def test_uint16_covers_the_unit_interval_exactly_at_the_ends():
    x = np.array([0.0, 1.0, 0.5, -0.1, 1.2], np.float32)
    np.testing.assert_allclose(store.decode_cubes(store.encode_cubes(x, "uint16")), [0, 1, 0.5, 0, 1],
                               atol=1e-5)


def test_same_content_gives_identical_bytes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_an_aborted_writer_leaves_nothing_that_loads(tmp_path):
    with pytest.raises(RuntimeError):
        with store.StoreWriter(tmp_path / "s", cube_shape=SHAPE) as w:
            w.add("train", _cubes(1)[0], 0)
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="not a visual-word store"):
        store.open_store(tmp_path / "s")


def test_a_killed_writer_is_invisible_and_cleaned_up_by_the_next(tmp_path):
    w = store.StoreWriter(tmp_path / "s", cube_shape=SHAPE)
    w.add("train", _cubes(1)[0], 0)  # never committed: as if the process died here
    assert not (tmp_path / "s").exists()
    _write(tmp_path / "s")
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    assert len(store.open_store(tmp_path / "s").source("train")) == 7


def test_commit_replaces_an_older_store(tmp_path):
    _write(tmp_path / "s", n_train=7)
    _write(tmp_path / "s", n_train=4)
    assert store.open_store(tmp_path / "s").num_cubes("train") == 4
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_truncated_shard_is_detected(tmp_path):
    _write(tmp_path / "s")
    shard = tmp_path / "s" / "train-00001.array_record"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="train-00001.array_record.*truncated"):
        store.open_store(tmp_path / "s")


def test_missing_shard_and_bad_manifest_are_named(tmp_path):
    _write(tmp_path / "s")
    (tmp_path / "s" / "validation-00000.array_record").unlink()
    with pytest.raises(DataError, match="validation-00000.array_record.*missing"):
        store.open_store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        store.open_store(tmp_path / "s")


def test_manifest_counts_must_match_shards(tmp_path):
    _write(tmp_path / "s")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["num_records"] = 2
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="train-00000.array_record: 3 records, the manifest says 2"):
        store.open_store(tmp_path / "s")


def test_writer_rejects_a_wrong_cube_shape(tmp_path):
    with store.StoreWriter(tmp_path / "s", cube_shape=SHAPE) as w:
        with pytest.raises(ValueError, match="shape"):
            w.add("train", np.zeros((8, 8, 8)), 0)


def _released(directory, folds=(1, 2), n=5):
    rng = np.random.default_rng(0)
    data = {}
    for k in folds:
        for r in (1, 2, 3):
            x = rng.random((n, 8, 8, 4))
            y = (np.arange(n) + 50 * (k - 1)).reshape(n, 1).astype(np.float64)
            np.save(directory / f"train_data{r}_vwGen_ex_ref_fold{k}.0.npy", x)
            np.save(directory / f"train_label{r}_vwGen_ex_ref_fold{k}.0.npy", y)
            data[(r, k)] = (x, y)
        np.save(directory / f"val_data1_vwGen_ex_ref_fold{k}.0.npy", rng.random((2, 8, 8, 4)))
        np.save(directory / f"val_label1_vwGen_ex_ref_fold{k}.0.npy", np.zeros((2, 1)))
    return data


def test_released_layout_selects_resolutions_and_folds(tmp_path):
    data = _released(tmp_path)
    src = store.ReleasedSource(tmp_path, resolutions=(1, 3), folds=(2,))
    assert len(src) == 10 and src.cube_shape == (8, 8, 4)
    e = src[7]  # second file = (r=3, k=2), element 2
    assert e["cube"].dtype == np.float32 and int(e["label"]) == 52
    np.testing.assert_allclose(e["cube"], data[(3, 2)][0][2], rtol=1e-6)
    assert len(store.ReleasedSource(tmp_path)) == 30
    val = store.ReleasedSource(tmp_path, split="validation", resolutions=(1,))
    assert len(val) == 4
    with pytest.raises(IndexError):
        src[10]


def test_released_classes_keeps_the_first_classes(tmp_path):
    """classes=N keeps the cubes labelled below N (train.py's first 44 of fold 1's 50)."""
    data = _released(tmp_path, folds=(1,), n=5)  # labels 0..4 in every file
    src = store.ReleasedSource(tmp_path, folds=(1,), classes=3)
    assert len(src) == 9 and src.num_classes == 3
    assert sorted(src.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    e = src[5]  # second file (r=2), its third kept row: row 2, label 2
    assert int(e["label"]) == 2
    np.testing.assert_allclose(e["cube"], data[(2, 1)][0][2], rtol=1e-6)
    assert all(int(src[i]["label"]) < 3 for i in range(len(src)))
    assert len(store.ReleasedSource(tmp_path, folds=(1,), classes=50)) == 15  # all below 50
    assert len(store.ReleasedSource(tmp_path, split="validation", resolutions=(1,), classes=3)) == 2
    with pytest.raises(IndexError):
        src[9]


def test_released_layout_errors_name_the_file(tmp_path):
    _released(tmp_path, folds=(1,))
    with pytest.raises(DataError, match="train_data2_vwGen_ex_ref_fold3.0.npy"):
        store.ReleasedSource(tmp_path, folds=(3,), resolutions=(2,))
    (tmp_path / "train_label2_vwGen_ex_ref_fold1.0.npy").unlink()
    with pytest.raises(DataError, match="train_label2_vwGen_ex_ref_fold1.0.npy"):
        store.ReleasedSource(tmp_path)
    np.save(tmp_path / "train_label2_vwGen_ex_ref_fold1.0.npy", np.zeros((4, 1)))
    with pytest.raises(DataError, match=r"expected \(5, 1\) labels"):
        store.ReleasedSource(tmp_path)
    with pytest.raises(DataError, match="no such directory"):
        store.ReleasedSource(tmp_path / "nope")
