"""The embedded phantoms as a labeled dataset: an nnU-Net v2 raw folder and a candidate CSV
that the fine-tuning readers (`transvw_jax.data.labeled`) take as they are."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from transvw_jax.data import labeled
from transvw_jax.data.synthetic import make_phantom, write_labeled_dataset, write_phantoms

SHAPE = (48, 48, 24)
SPACING = (2.5, 2.5, 5.0)
SEED = 3
COUNT = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("labeled") / "Dataset001_phantoms"
    out = write_labeled_dataset(directory, COUNT, shape=SHAPE, seed=SEED, spacing=SPACING)
    assert out == directory
    return directory


def phantom(i: int):
    return make_phantom(i, shape=SHAPE, seed=SEED, spacing=SPACING)


def test_reads_back_as_nnunet_dataset(dataset):
    ds = labeled.read_nnunet(dataset)
    assert [c.name for c in ds.cases] == [f"phantom_{i:04d}" for i in range(COUNT)]
    assert ds.num_classes == 2
    assert ds.class_names == {0: "background", 1: "nodule"}
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == COUNT
    assert meta["file_ending"] == ".nii.gz" and meta["name"] == "phantom_nodules"
    for i, case in enumerate(ds.cases):
        image, label = labeled.load_case(case, ds.num_classes)
        ph = phantom(i)
        assert image.shape == SHAPE
        np.testing.assert_array_equal(label, ph.nodules)


def test_images_are_the_bytes_write_phantoms_writes(dataset, tmp_path):
    plain = write_phantoms(tmp_path, COUNT, shape=SHAPE, seed=SEED, spacing=SPACING)
    for i, path in enumerate(plain):
        assert (dataset / "imagesTr" / f"phantom_{i:04d}_0000.nii.gz").read_bytes() == path.read_bytes()


def test_candidates_are_nodule_centres_and_clear_negatives(dataset):
    candidates = labeled.read_candidates(dataset / "candidates.csv")
    assert (dataset / "candidates.csv").read_text().splitlines()[0] == "volume,x,y,z,label"
    for i in range(COUNT):
        image = dataset / "imagesTr" / f"phantom_{i:04d}_0000.nii.gz"
        mine = [c for c in candidates if c.volume == image]
        nodules = phantom(i).nodules
        _, n_nodules = ndimage.label(nodules, structure=np.ones((3, 3, 3)))
        positives = [c.centre for c in mine if c.label == 1]
        negatives = [c.centre for c in mine if c.label == 0]
        assert len(positives) == n_nodules
        assert len(negatives) == 2 and len(set(negatives)) == 2
        assert all(nodules[c] == 1 for c in positives)
        assert all(nodules[c] == 0 for c in negatives)
        # negatives keep a margin from every nodule
        near = ndimage.binary_dilation(nodules > 0, structure=np.ones((3, 3, 3)), iterations=2)
        assert not any(near[c] for c in negatives)
    assert {c.label for c in candidates} == {0, 1}
    assert len({c.volume for c in candidates}) == COUNT


def test_negatives_per_case(tmp_path):
    write_labeled_dataset(tmp_path, 1, shape=(32, 32, 16), seed=SEED, negatives_per_case=5)
    candidates = labeled.read_candidates(tmp_path / "candidates.csv")
    assert sum(c.label == 0 for c in candidates) == 5


def test_same_arguments_give_identical_files(dataset, tmp_path):
    again = write_labeled_dataset(tmp_path / "again", COUNT, shape=SHAPE, seed=SEED, spacing=SPACING)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert not any(p.name.startswith(".") for p in files)          # no temporaries left behind
    for rel in files:
        assert (again / rel).read_bytes() == (dataset / rel).read_bytes(), rel


def test_count_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="count"):
        write_labeled_dataset(tmp_path, 0, shape=SHAPE)
