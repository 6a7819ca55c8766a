"""Self-discovery on a handful of small phantoms: neighbours, coordinates, determinism."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from transvw_jax import configuration, discovery
from transvw_jax.data import store, synthetic, volumes
from transvw_jax.discovery import words
from transvw_jax.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import default as base_config  # noqa: E402
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_coordinates_keep_borders_distance_and_avoid_air(discovered, phantoms):
    config, workdir = discovered
    plan, patients, _, s = _read(workdir)
    w = config.discovery.words
    cube = np.array(config.data.cube_shape)
    coords = np.array(plan["coordinates"])
    # the originals' range: size - cube - 1 - border, and room for the air filter's look below in depth
    high = np.array([32, 32, 16]) - np.array(w.border) - cube - 1 - np.array([0, 0, words.AIR_DEPTH])
    assert (coords >= np.array(w.border)).all() and (coords <= high).all()
    d = np.sqrt(((coords[:, None] - coords[None]) ** 2).sum(-1)) + np.eye(len(coords)) * 1e9
    assert d.min() >= w.min_distance
    assert plan["reference_redraws"] == len(plan["redrawn_references"])
    assert not set(plan["redrawn_references"]) & set(plan["references"])
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


@pytest.mark.slow
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


def _air_cube_score(tissue_slices, depth=8, start_z=0, cube=(2, 2, 4)):
    """The score of a cube whose columns are all alike: tissue (1.0) in `tissue_slices`, else air (0.0)."""
    v = np.zeros((2, 2, depth), np.float32)
    v[:, :, list(tissue_slices)] = 1.0
    return words.air_scores(v, np.array([[0, 0, start_z]]), cube, 0.5)[0]


@pytest.mark.parametrize("tissue,start_z,expected", [
    (range(8), 0, 1.0),  # every voxel meets tissue in its own slice
    ((), 0, 0.0),  # lung / outside air
    ((4,), 0, 0.5 / 4),  # the first slice below the cube: the last voxel meets it at k = 1
    ((5,), 0, 0.0),  # the second slice below: k = 2 for the last voxel, which scores 0
    ((4, 5), 0, 0.5 / 4),
    ((0, 2, 4, 6), 0, (1 + 0.5 + 1 + 0.5) / 4),  # alternate slices: 1, 1/2, 1, 1/2
    ((1, 3, 5, 7), 0, (0.5 + 1 + 0.5 + 1) / 4),
    ((4,), 1, (0 + 0 + 0.5 + 1) / 4),  # cube slices 1-4: z=2 -> k=2, z=3 -> k=1, z=4 -> k=0
    ((2,), 0, (0 + 0.5 + 1 + 0) / 4),  # z=0 -> k=2, z=1 -> k=1, z=2 -> k=0, z=3 -> none
])
def test_air_score_is_the_originals_mean_voxel_score(tissue, start_z, expected):
    assert _air_cube_score(tissue, start_z=start_z) == pytest.approx(expected, abs=1e-12)


def test_air_score_mixes_columns_counts_the_threshold_as_tissue_and_pads_short_volumes():
    v = np.zeros((2, 2, 8), np.float32)
    v[0] = 0.5  # exactly the threshold: tissue (>=), so half the columns score 1 everywhere
    assert words.air_scores(v, np.array([[0, 0, 0], [0, 0, 3]]), (2, 2, 4), 0.5).tolist() == [0.5, 0.5]
    # a volume with no slice below the cube: the slices beyond its end count as air
    assert _air_cube_score((3,), depth=4) == pytest.approx((0 + 0 + 0.5 + 1) / 4)
    assert _air_cube_score((3,), depth=4) == _air_cube_score((3,), depth=8)


def test_air_filter_rejects_only_cubes_scoring_above_lung_max():
    cfg = base_config.get_config().discovery.words
    assert cfg.max_air_score == 0.15 and cfg.air_threshold == (-150 + 1000) / 2000
    v = np.zeros((1, 1, 24), np.float32)
    v[0, 0, :3] = 1.0  # 3 of 20 voxels score 1: mean 0.15, not above lung_max -> kept
    w = v.copy()
    w[0, 0, 10] = 1.0  # + 1 (z=10) + 1/2 (z=9): mean 0.225 -> rejected
    starts = np.zeros((1, 3), int)
    assert words.air_scores(v, starts, (1, 1, 20), cfg.air_threshold)[0] == 0.15
    assert words.passes_air_filter(v, starts, (1, 1, 20), cfg).tolist() == [True]
    assert words.passes_air_filter(w, starts, (1, 1, 20), cfg).tolist() == [False]


def test_coordinate_range_leaves_the_originals_room_below_the_cube():
    low, high, tight = words.coordinate_range((300, 300, 100), (64, 64, 32), (100, 100, 30))
    # randint(border, size - crop - 1 - border) in-plane; size - deps - len_depth - 1 - border in depth
    assert low.tolist() == [100, 100, 30] and high.tolist() == [135, 135, 34] and not tight.any()
    low, high, tight = words.coordinate_range((200, 300, 60), (64, 64, 32), (100, 100, 30))
    assert tight.tolist() == [True, False, True]
    assert low.tolist() == [68, 100, 12] and high.tolist() == [68, 135, 12]  # centred, room below kept


def test_a_reference_without_a_passing_coordinate_is_redrawn_and_running_out_is_an_error():
    air, tissue = np.zeros((12, 12, 10), np.float32), np.ones((12, 12, 10), np.float32)
    vols = [tissue, air, tissue, air, tissue, air]
    cfg = base_config.get_config().discovery.words
    cfg.update(train_instances=2, val_instances=0, border=(1, 1, 1), max_tries=20, min_distance=1.0)
    splits = ["train"] * 6
    embeddings = np.random.default_rng(0).random((6, 3))
    draws = np.random.default_rng([0, 0]).permutation(6).tolist()  # plan_words' draw order for seed 0
    calls = []

    def load(i):
        calls.append(i)
        return vols[i]

    plan = words.plan_words(embeddings, splits, load, 3, (4, 4, 4), cfg, seed=0)
    assert plan.references.tolist() == [p for p in draws if p % 2]
    last = draws.index(plan.references[-1])
    assert plan.redrawn.tolist() == [p for p in draws[:last] if p % 2 == 0]
    assert calls == draws[:last + 1]  # each drawn reference loaded once, the redrawn ones included
    with pytest.raises(DataError, match=r"only 3 of model.num_classes=4 classes found a reference: the "
                                        r"other 3 training patients have no cube that passes the air filter"):
        words.plan_words(embeddings, splits, vols.__getitem__, 4, (4, 4, 4), cfg, seed=0)
    with pytest.raises(DataError, match=r"no patient has a cube that passes the air filter \(discovery.words"
                                        r".max_air_score=0.15, "):
        words.plan_words(embeddings, splits, lambda i: tissue, 1, (4, 4, 4), cfg, seed=0)


def test_random_cubes_are_skipped_and_patients_given_up_as_in_models_genesis(tmp_path):
    air, tissue = np.zeros((12, 12, 10), np.float32), np.ones((12, 12, 10), np.float32)
    cfg = base_config.get_config().discovery.words
    cfg.update(border=(1, 1, 1), random_cubes_per_patient=3)
    assert base_config.get_config().discovery.words.random_cubes_per_patient == 32  # the paper's scale
    half = air.copy()
    half[:6] = 1.0  # only starts with x >= 6 (x in [1, 6]) keep the cube clear of tissue
    starts = words.random_starts(half, (4, 4, 4), cfg, np.random.default_rng(0))
    assert len(starts) == 3 and (starts[:, 0] == 6).all()
    assert len(words.random_starts(tissue, (4, 4, 4), cfg, np.random.default_rng(0))) == 0
    with store.StoreWriter(tmp_path / "s", cube_shape=(4, 4, 4)) as w:
        counts = words.extract_random(["a", "b", "c"], ["train", "train", "validation"],
                                      [air, tissue, air].__getitem__, w, (4, 4, 4), cfg, seed=0)
        w.commit(num_classes=1)
    assert counts == {"train": 3, "validation": 3, "cubes_skipped": 3, "patients_given_up": 1,
                      "patients_without_cubes": 1}
    with pytest.raises(DataError, match="no patient has a cube that passes the air filter"), \
            store.StoreWriter(tmp_path / "t", cube_shape=(4, 4, 4)) as w:
        words.extract_random(["b"], ["train"], lambda i: tissue, w, (4, 4, 4), cfg, seed=0)


def test_extra_resolutions_are_anchored_at_the_cube_corner_plus_the_offset():
    """TransVW cuts them at [x + dx, x + dx + size) x [y + dy, y + dy + size) x [z, z + depth)."""
    x, y, z = np.meshgrid(np.arange(40), np.arange(40), np.arange(12), indexing="ij")
    volume = (x * 10000 + y * 100 + z).astype(np.float32)  # each voxel's value names its coordinates
    same = words.Crop("train", 0, 0, 0, (10, 10, 2), 2, (16, 16, 8), (3, -2))
    cube, begin = words.cut(volume, same, (16, 16, 8))
    assert begin == (13, 8, 2)
    np.testing.assert_array_equal(cube, volume[13:29, 8:24, 2:10])
    larger = words.Crop("train", 0, 0, 0, (10, 10, 2), 2, (24, 24, 8), (3, -2))
    cube, begin = words.cut(volume, larger, (16, 16, 8))
    assert cube.shape == (16, 16, 8) and begin == (13, 8, 2)  # same corner whatever the size
    # half-pixel linear resize 24 -> 16 samples input 0.25, 1.75, ...: corner at (13.25, 8.25, 2)
    assert cube[0, 0, 0] == pytest.approx(13.25 * 10000 + 8.25 * 100 + 2, abs=0.5)
    assert cube[-1, -1, -1] == pytest.approx(35.75 * 10000 + 30.75 * 100 + 9, abs=0.5)  # 13 + 22.75
    corner = words.Crop("train", 0, 0, 0, (0, 0, 0), 2, (24, 24, 8), (-5, -5))
    assert words.cut(volume, corner, (16, 16, 8))[1] == (0, 0, 0)  # clamped inside the volume
    far = words.Crop("train", 0, 0, 0, (20, 20, 4), 3, (24, 24, 8), (5, 5))
    assert words.cut(volume, far, (16, 16, 8))[1] == (16, 16, 4)  # 25 + 24 > 40: clamped


@pytest.mark.slow
def test_bad_inputs_get_clear_errors(phantoms, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no volumes"):
        discovery.discover(_config(tmp_path / "empty"), tmp_path / "w")
    config = _config(phantoms)
    config.model.num_classes = 50
    with pytest.raises(ConfigError, match="model.num_classes=50 needs as many training patients"):
        discovery.discover(config, tmp_path / "w2")
    assert not (tmp_path / "w2" / "discovery" / "autoencoder").exists()  # refused before training
    config = _config(phantoms)
    config.discovery.autoencoder.size = (16, 16, 6)
    with pytest.raises(ConfigError, match="discovery.autoencoder.size"):
        discovery.discover(config, tmp_path / "w3")


def test_patients_are_streamed_one_load_per_reference_and_per_patient(tmp_path):
    """Planning loads each class's reference once; extraction visits each patient once."""
    rng = np.random.default_rng(0)
    vols = [rng.random((20, 20, 10), dtype=np.float32) * 0.2 + 0.1 for _ in range(9)]  # air: all pass
    calls = []

    def load(i):
        calls.append(i)
        return vols[i]

    cfg = base_config.get_config().discovery.words
    cfg.update(train_instances=4, val_instances=2, border=(1, 1, 1), extra_size=(6, 10), extra_offset=(-1, 1),
               min_distance=2.0)  # 5 classes 5 voxels apart may not fit in the 10 x 10 x 1 starts
    splits = ["train"] * 6 + ["validation"] * 3
    plan = words.plan_words(rng.random((9, 5)), splits, load, 5, (8, 8, 4), cfg, seed=0)
    assert len(plan.redrawn) == 0 and sorted(calls) == sorted(plan.references.tolist())
    calls.clear()
    with store.StoreWriter(tmp_path / "s", cube_shape=(8, 8, 4)) as w:
        counts = words.extract(plan, [f"p{i}" for i in range(9)], load, w, (8, 8, 4))
        w.commit(num_classes=5)
    assert calls == sorted(set(calls))  # each patient once, in order
    assert counts == {"train": 5 * 4 * 3, "validation": 5 * 2}


def test_random_mode_draws_air_free_cubes_per_patient_reproducibly(phantoms, tmp_path, caplog):
    """Models Genesis data: K random cubes per patient, one class, no auto-encoder."""
    config = _config(phantoms)
    config.discovery.mode = "random"
    config.discovery.words.random_cubes_per_patient = 3
    with caplog.at_level("INFO"):
        discovery.discover(config, tmp_path / "a")
    s = store.open_store(tmp_path / "a" / "store")
    plan = json.loads((tmp_path / "a" / "discovery" / "plan.json").read_text())
    assert plan["mode"] == "random" and plan["train"] == s.num_cubes("train")
    cubes = s.num_cubes("train") + s.num_cubes("validation")
    assert s.num_classes == 1 and cubes == 12 * 3 - plan["cubes_skipped"]
    skips = f"cubes_skipped={plan['cubes_skipped']}, patients_given_up={plan['patients_given_up']}"
    assert skips in caplog.text  # the discovery summary line
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


def _subset_layout(phantoms, root):
    """LUNA16's layout: subset folders under one root; subset7 holds only corrupt scans."""
    files = sorted(phantoms.iterdir())
    for n, chunk in ((0, files[:4]), (1, files[4:8]), (5, files[8:10]), (6, files[10:])):
        (root / f"subset{n}").mkdir(parents=True)
        for f in chunk:
            (root / f"subset{n}" / f.name).write_bytes(f.read_bytes())
    (root / "subset7").mkdir()
    (root / "subset7" / "bad.nii.gz").write_bytes(b"not a volume")
    (root / "subset7" / "bad.mhd").write_text("ObjectType = Image\nNDims = 3\nElementDataFile = gone.raw\n")
    return root


def test_subset_split_reads_only_the_named_subsets(phantoms, tmp_path, monkeypatch):
    """Models Genesis' protocol: train on some subsets, validate on others, never read the rest."""
    root = _subset_layout(phantoms, tmp_path / "luna")
    config = _config(root)
    config.discovery.mode = "random"
    config.discovery.words.random_cubes_per_patient = 2
    config.discovery.train_subsets = (0, 1)
    config.discovery.val_subsets = (5, 6)
    config.discovery.orientation = "reference"
    opened = []
    read_raw = volumes.read_raw

    def spy(path, orientation="ras"):
        opened.append((Path(path), orientation))
        return read_raw(path, orientation)

    class Stop(Exception):
        pass

    def extract_random(paths, splits, load, *args):  # every patient once, then stop: no cubes needed
        for i in range(len(paths)):
            load(i)
        raise Stop

    monkeypatch.setattr(volumes, "read_raw", spy)
    monkeypatch.setattr(words, "extract_random", extract_random)
    with pytest.raises(Stop):
        discovery.discover(config, tmp_path / "w")
    assert opened and all(p.parent.name != "subset7" for p, _ in opened)
    assert {o for _, o in opened} == {"reference"}
    record = json.loads((tmp_path / "w" / "discovery" / "patients.json").read_text())
    folders = [Path(p).parent.name for p in record["patients"]]
    assert folders == ["subset0"] * 4 + ["subset1"] * 4 + ["subset5"] * 2 + ["subset6"] * 2
    assert record["splits"] == ["train"] * 8 + ["validation"] * 4
    assert record["skipped"] == []  # subset7's corrupt files are not even listed
    assert record["split_by"] == {"subsets": {"train": [0, 1], "validation": [5, 6], "pattern": "subset{}"}}
    assert record["orientation"] == "reference"


def test_subset_split_missing_folder_and_one_folder_fallback(phantoms, tmp_path):
    root = _subset_layout(phantoms, tmp_path / "luna")
    d = _config(root).discovery
    d.train_subsets, d.val_subsets = (0, 1), (5, 8)
    with pytest.raises(ConfigError) as info:
        discovery.patient_files(d, root)
    assert str(info.value) == f"discovery.val_subsets: no folder {root / 'subset8'}"
    d.subset_pattern = "fold{}"  # none of the named folders: the random split of root's own files
    assert discovery.patient_files(d, root) == ([], None)
    d = _config(phantoms).discovery
    d.train_subsets, d.val_subsets = (0, 1, 2, 3, 4), (5, 6)
    files, split_of = discovery.patient_files(d, phantoms)
    assert files == sorted(phantoms.iterdir()) and split_of is None
    d.train_subsets, d.val_subsets = (), ()
    assert discovery.patient_files(d, phantoms) == (files, None)


@pytest.mark.parametrize("key,value,message", [
    ("val_subsets", (4, 5), "discovery.val_subsets: subset 4 is also in discovery.train_subsets"),
    ("train_subsets", (0, 0), "discovery.train_subsets names a subset twice"),
    ("train_subsets", (-1,), "discovery.train_subsets must be subset numbers >= 0"),
    ("subset_pattern", "subset", "discovery.subset_pattern must be one folder name"),
    ("orientation", "lps", "discovery.orientation: 'lps' is not one of ras, reference"),
])
def test_subset_and_orientation_keys_are_validated(key, value, message):
    config = _config("/nonexistent")
    config.discovery.train_subsets, config.discovery.val_subsets = (0, 1, 2, 3, 4), (5, 6)
    configuration.validate(config, stages=("discover",))
    config.discovery[key] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        configuration.validate(config, stages=("discover",))
    assert "\n" not in str(info.value)
    config = _config("/nonexistent")
    config.discovery.val_subsets = (5, 6)
    with pytest.raises(ConfigError, match="discovery.train_subsets is empty"):
        configuration.validate(config, stages=("discover",))


# --------------------------------------------------------------------------- the auto-encoder on the engine


def _ae_config(steps):
    import ml_collections

    return ml_collections.ConfigDict({"size": (16, 16, 8), "width": 2, "steps": steps, "batch_size": 4,
                                      "learning_rate": 1e-3, "seed": 0, "log_every": 1,
                                      "checkpoint_every": 500, "keep_checkpoints": 1})


@pytest.mark.slow
def test_a_weights_only_auto_encoder_checkpoint_is_reused_or_set_aside(tmp_path, caplog):
    """Workdirs of earlier versions hold the finished auto-encoder as weights only: the same
    step count reuses them; another is set aside and trained anew (the engine cannot resume
    from weights alone), instead of a raw Orbax KeyError."""
    import jax
    import ml_collections

    from transvw_jax import checkpointing
    from transvw_jax.discovery import autoencoder
    from transvw_jax.models import init_variables
    from transvw_jax.tasks import autoencoder as ae_task

    model_cfg = ml_collections.ConfigDict({"conv_impl": "xla3d"})
    variables = init_variables(ae_task.make_model(model_cfg, 2), jax.random.key(7))
    checkpointing.save(tmp_path, 3, variables)
    cache = np.random.default_rng(0).random((5, 16, 16, 8)).astype(np.float16)
    with caplog.at_level("INFO"):
        reused = autoencoder.train_autoencoder(cache, _ae_config(3), tmp_path, model=model_cfg)
    assert "reusing" in caplog.text and "weights only" in caplog.text
    for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained = autoencoder.train_autoencoder(cache, _ae_config(1), tmp_path, model=model_cfg)
    assert (tmp_path / "checkpoints.weights-only" / "3").is_dir()
    assert (tmp_path / "checkpoints" / "1" / checkpointing.TRAIN_STATE).is_dir()
    assert jax.tree.structure(trained) == jax.tree.structure(reused)


def test_the_auto_encoder_batch_follows_the_volumes_and_processes():
    from transvw_jax.discovery import autoencoder

    assert autoencoder.global_batch(4, 12) == 4
    assert autoencoder.global_batch(4, 3) == 3  # fewer volumes than the setting
    mesh = autoencoder.mesh_for(3)  # 3 volumes on 8 simulated devices: 3 of them
    assert mesh.size == 3


def test_a_weights_only_checkpoint_is_no_run_to_resume(tmp_path):
    import jax

    from transvw_jax import checkpointing
    from transvw_jax.errors import CheckpointError
    from transvw_jax.models import UNet3D, abstract_variables, init_variables

    model = UNet3D(width=2)
    checkpointing.save(tmp_path, 2, init_variables(model, jax.random.key(0)))
    like = abstract_variables(model)
    with pytest.raises(CheckpointError, match="holds the weights only"):
        checkpointing.RunCheckpointer(tmp_path).restore(2, like, {})
