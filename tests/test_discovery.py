"""Self-discovery on a handful of small phantoms: neighbours, coordinates, determinism."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from transvw_jax import discovery
from transvw_jax.data import store, synthetic, volumes
from transvw_jax.discovery import words
from transvw_jax.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo  # noqa: E402


def _config(volumes_dir, seed=0):
    config = demo.get_config("runlocal")
    config.discovery.volumes_dir = str(volumes_dir)
    config.discovery.seed = seed
    return config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    d = tmp_path_factory.mktemp("volumes")
    synthetic.write_phantoms(d, 12, shape=(32, 32, 16), spacing=(10.0, 10.0, 20.0))
    return d


@pytest.fixture(scope="module")
def discovered(phantoms, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = _config(phantoms)
    discovery.discover(config, workdir)
    return config, workdir


def _read(workdir):
    out = workdir / "discovery"
    return (json.loads((out / "plan.json").read_text()), json.loads((out / "patients.json").read_text()),
            np.load(out / "embeddings.npy"), store.open_store(workdir / "store"))


def test_store_holds_every_class_at_every_resolution(discovered):
    config, workdir = discovered
    _, _, embeddings, s = _read(workdir)
    w = config.discovery.words
    classes = config.model.num_classes
    assert s.num_classes == classes and s.cube_shape == (16, 16, 8)
    assert embeddings.shape == (12, 16 * config.discovery.autoencoder.width)
    assert s.num_cubes("train") == classes * w.train_instances * (1 + w.extra_resolutions)
    assert s.num_cubes("validation") == classes * w.val_instances
    meta = s.manifest["splits"]["train"]["cubes"]
    assert sorted(set(meta["resolution"])) == [1, 2, 3]
    assert np.bincount(meta["label"]).tolist() == [w.train_instances * 3] * classes
    assert s.manifest["seeds"]["discovery"] == 0 and s.manifest["config"]["cube_shape"] == [16, 16, 8]


def test_each_class_comes_from_the_nearest_patients_of_its_reference(discovered):
    config, workdir = discovered
    plan, patients, embeddings, s = _read(workdir)
    paths, splits = patients["patients"], np.array(patients["splits"])
    references = plan["references"]
    assert len(set(references)) == len(references)  # drawn without replacement
    assert all(splits[r] == "train" for r in references)
    for split, count in (("train", config.discovery.words.train_instances),
                         ("validation", config.discovery.words.val_instances)):
        meta = s.manifest["splits"][split]["cubes"]
        sources = np.array([s.manifest["sources"][i] for i in meta["source"]])
        labels = np.array(meta["label"])
        pool = np.flatnonzero(splits == split)
        for c, ref in enumerate(references):
            d = np.linalg.norm(embeddings[pool] - embeddings[ref], axis=1)
            nearest = {paths[i] for i in pool[np.argsort(d, kind="stable")[:count]]}
            assert set(sources[labels == c]) == nearest, (split, c)
            if split == "train":
                assert paths[ref] in nearest


def test_coordinates_keep_borders_distance_and_avoid_air(discovered, phantoms):
    config, workdir = discovered
    plan, patients, _, s = _read(workdir)
    w = config.discovery.words
    cube = np.array(config.data.cube_shape)
    coords = np.array(plan["coordinates"])
    high = np.array([32, 32, 16]) - np.array(w.border) - cube
    assert (coords >= np.array(w.border)).all() and (coords <= high).all()
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1)) + np.eye(len(coords)) * 1e9
    assert d.min() >= w.min_distance
    for c, ref in enumerate(plan["references"]):
        v = volumes.load_volume(patients["patients"][ref]).array
        score = words.air_scores(v, coords[c:c + 1], cube, w.air_threshold)[0]
        assert score <= w.max_air_score
    # the resolution-1 cube of the reference is the volume's crop at the coordinate
    meta = s.manifest["splits"]["train"]["cubes"]
    ref = plan["references"][0]
    i = next(i for i, (lab, src, res) in enumerate(zip(meta["label"], meta["source"], meta["resolution"],
                                                        strict=True))
             if lab == 0 and res == 1 and s.manifest["sources"][src] == patients["patients"][ref])
    x, y, z = coords[0]
    expected = volumes.load_volume(patients["patients"][ref]).array[x:x + 16, y:y + 16, z:z + 8]
    assert meta["coord"][i] == coords[0].tolist()
    np.testing.assert_allclose(store.decode_cubes(s.source("train")[i]["cube"]), expected, atol=1e-5)


def test_same_seed_gives_a_byte_identical_store_and_another_seed_does_not(discovered, phantoms, tmp_path):
    config, workdir = discovered
    discovery.discover(_config(phantoms), tmp_path / "again")
    first = sorted(p.name for p in (workdir / "store").iterdir())
    assert first == sorted(p.name for p in (tmp_path / "again" / "store").iterdir())
    for name in first:
        again = (tmp_path / "again" / "store" / name).read_bytes()
        assert (workdir / "store" / name).read_bytes() == again, name
    discovery.discover(_config(phantoms, seed=1), tmp_path / "other")
    other = json.loads((tmp_path / "other" / "discovery" / "plan.json").read_text())
    assert other["references"] != _read(workdir)[0]["references"]


def test_air_score_is_the_mean_first_tissue_depth():
    v = np.zeros((4, 4, 10), np.float32)
    v[:2, :, 3:] = 1.0  # half the columns meet tissue at depth 3, the others never (score 0)
    score = words.air_scores(v, np.array([[0, 0, 0], [0, 0, 2]]), (4, 4, 8), 0.5)
    np.testing.assert_allclose(score, [0.5 * 3 / 8, 0.5 * 1 / 8])


def test_extra_resolutions_are_resized_crops_around_the_cube():
    volume = np.random.default_rng(0).random((40, 40, 12), dtype=np.float32)
    crop = words.Crop("train", 0, 0, 0, (10, 10, 2), 2, (24, 24, 8), (3, -2))
    cube, begin = words.cut(volume, crop, (16, 16, 8))
    assert cube.shape == (16, 16, 8) and begin == (10 - 4 + 3, 10 - 4 - 2, 2)
    corner = words.Crop("train", 0, 0, 0, (0, 0, 0), 2, (24, 24, 8), (-5, -5))
    assert words.cut(volume, corner, (16, 16, 8))[1] == (0, 0, 0)  # clamped inside the volume


def test_bad_inputs_get_clear_errors(phantoms, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no volumes"):
        discovery.discover(_config(tmp_path / "empty"), tmp_path / "w")
    config = _config(phantoms)
    config.model.num_classes = 50
    with pytest.raises(ConfigError, match="model.num_classes=50"):
        discovery.discover(config, tmp_path / "w2")
    config = _config(phantoms)
    config.discovery.autoencoder.size = (16, 16, 6)
    with pytest.raises(ConfigError, match="discovery.autoencoder.size"):
        discovery.discover(config, tmp_path / "w3")


def test_patients_are_streamed_one_load_per_reference_and_per_patient(tmp_path):
    """Planning loads each class's reference once; extraction visits each patient once."""
    rng = np.random.default_rng(0)
    vols = [rng.random((20, 20, 10), dtype=np.float32) * 0.2 + 0.5 for _ in range(9)]
    calls = []

    def load(i):
        calls.append(i)
        return vols[i]

    cfg = words.default_config()
    cfg.update(train_instances=4, val_instances=2, border=(1, 1, 1), extra_size=(6, 10), extra_offset=(-1, 1))
    splits = ["train"] * 6 + ["validation"] * 3
    plan = words.plan_words(rng.random((9, 5)), splits, load, 5, (8, 8, 4), cfg, seed=0)
    assert sorted(calls) == sorted(plan.references.tolist())
    calls.clear()
    with store.StoreWriter(tmp_path / "s", cube_shape=(8, 8, 4)) as w:
        counts = words.extract(plan, [f"p{i}" for i in range(9)], load, w, (8, 8, 4))
        w.commit(num_classes=5)
    assert calls == sorted(set(calls))  # each patient once, in order
    assert counts == {"train": 5 * 4 * 3, "validation": 5 * 2}


def test_random_mode_draws_air_free_cubes_per_patient_reproducibly(phantoms, tmp_path):
    """Models Genesis data: K random cubes per patient, one class, no auto-encoder."""
    config = _config(phantoms)
    config.discovery.mode = "random"
    config.discovery.words.random_cubes_per_patient = 3
    discovery.discover(config, tmp_path / "a")
    s = store.open_store(tmp_path / "a" / "store")
    assert s.num_classes == 1 and s.num_cubes("train") + s.num_cubes("validation") == 12 * 3
    assert not (tmp_path / "a" / "discovery" / "autoencoder").exists()
    meta = s.manifest["splits"]["train"]["cubes"]
    assert set(meta["label"]) == {0}
    w = config.discovery.words
    for i in range(0, len(meta["label"]), 5):
        path = s.manifest["sources"][meta["source"][i]]
        v = volumes.load_volume(path).array
        start = np.array([meta["coord"][i]])
        assert words.air_scores(v, start, (16, 16, 8), w.air_threshold)[0] <= w.max_air_score
        assert (start[0] >= np.array(w.border)).all()
    discovery.discover(config, tmp_path / "b")
    for f in (tmp_path / "a" / "store").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / "store" / f.name).read_bytes(), f.name
    config.discovery.mode = "nope"
    with pytest.raises(ConfigError, match="discovery.mode"):
        discovery.discover(config, tmp_path / "c")
