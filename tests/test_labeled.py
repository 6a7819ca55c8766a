"""Labeled data for fine-tuning: nnU-Net layout, checks, patches, splits, candidate CSVs."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from transvw_jax.data import labeled, patches, synthetic
from transvw_jax.errors import DataError


@pytest.fixture()
def nnunet(tmp_path):
    """Three phantoms with their nodule masks in the nnU-Net v2 raw layout."""
    src = tmp_path / "src"
    synthetic.write_phantoms(src, 3, shape=(32, 32, 16), masks=True)
    root = tmp_path / "Dataset001_Nodules"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(3):
        shutil.copy(src / f"phantom_{i:04d}.nii.gz", root / "imagesTr" / f"case{i}_0000.nii.gz")
        shutil.copy(src / "masks" / f"phantom_{i:04d}.nii.gz", root / "labelsTr" / f"case{i}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "nodule": 1},
                                                   "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    return root


def test_nnunet_cases_load_with_their_masks(nnunet):
    ds = labeled.read_nnunet(nnunet)
    assert [c.name for c in ds.cases] == ["case0", "case1", "case2"]
    assert ds.num_classes == 2 and ds.class_names == {0: "background", 1: "nodule"}
    image, label = labeled.load_case(ds.cases[0], ds.num_classes)
    assert image.shape == label.shape == (32, 32, 16) and label.dtype == np.int32
    np.testing.assert_array_equal(label, synthetic.make_phantom(0, shape=(32, 32, 16)).nodules)
    assert 0.0 <= image.min() and image.max() <= 1.0


def _write(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def test_every_bad_case_is_named(nnunet):
    (nnunet / "labelsTr" / "case2.nii.gz").unlink()
    with pytest.raises(DataError, match="case 'case2' has no label"):
        labeled.read_nnunet(nnunet)
    case = labeled.Case("x", nnunet / "imagesTr" / "case0_0000.nii.gz", nnunet / "labelsTr" / "bad.nii.gz")
    affine = nib.load(case.image).affine
    _write(case.label, np.zeros((32, 32, 8), np.uint8), affine)
    with pytest.raises(DataError, match="bad.nii.gz: label shape"):
        labeled.load_case(case, 2)
    _write(case.label, np.zeros((32, 32, 16), np.uint8), affine * np.diag([2, 1, 1, 1]))
    with pytest.raises(DataError, match="bad.nii.gz: label affine differs"):
        labeled.load_case(case, 2)
    _write(case.label, np.full((32, 32, 16), 0.5, np.float32), affine)
    with pytest.raises(DataError, match="not integers"):
        labeled.load_case(case, 2)
    _write(case.label, np.full((32, 32, 16), 3, np.uint8), affine)
    with pytest.raises(DataError, match="label value 3 outside the 2 classes"):
        labeled.load_case(case, 2)
    (nnunet / "dataset.json").write_text("{}")
    with pytest.raises(DataError, match="dataset.json"):
        labeled.read_nnunet(nnunet)


def _cached_case(tmp_path, name, image, label):
    """A `patches.CachedCase` written directly (the files `patches.cache_cases` would write)."""
    case = patches.CachedCase(name, tmp_path / f"{name}.image.npy", tmp_path / f"{name}.label.npy",
                              tmp_path / f"{name}.fg.npy")
    np.save(case.image, image)
    np.save(case.label, label)
    np.save(case.foreground, np.argwhere(label > 0).astype(np.int32))
    return case


def test_patch_source_oversamples_foreground_at_the_edge_and_pads_small_cases(tmp_path):
    """The fine-tuning patch sampler: foreground-centred patches stay inside the volume and
    keep a nodule in its corner, patches are a function of (seed, index), and a case
    smaller than the patch is edge-padded (its label with background)."""
    image = np.random.default_rng(0).integers(0, 65535, (40, 40, 20), dtype=np.uint16)
    label = np.zeros((40, 40, 20), np.uint8)
    label[30:33, 5:8, 2:4] = 1  # a small nodule in a corner
    case = _cached_case(tmp_path, "corner", image, label)
    fg = patches.PatchSource([case], (16, 16, 8), 10, foreground_fraction=1.0, seed=1)
    items = [fg[i] for i in range(len(fg))]
    assert all(it["cube"].shape == (16, 16, 8) and it["label"].shape == (16, 16, 8) for it in items)
    assert all(it["label"].sum() == label.sum() for it in items)  # the whole nodule, every time
    again = patches.PatchSource([case], (16, 16, 8), 10, foreground_fraction=1.0, seed=1)
    np.testing.assert_array_equal(again[3]["cube"], items[3]["cube"])
    other = patches.PatchSource([case], (16, 16, 8), 10, foreground_fraction=0.0, seed=2)
    assert any(not np.array_equal(other[i]["cube"], items[i]["cube"]) for i in range(10))

    small = _cached_case(tmp_path, "small", image[:10], label[:10])  # no foreground, 10 < 16 along x
    patch = patches.PatchSource([small], (16, 16, 8), 2, foreground_fraction=0.5, seed=0)[0]
    assert patch["cube"].shape == (16, 16, 8) and not patch["label"].any()
    np.testing.assert_array_equal(patch["cube"][10:], np.repeat(patch["cube"][9:10], 6, axis=0))


def test_split_is_seeded_and_disjoint():
    names = [f"c{i}" for i in range(10)]
    s = labeled.split_cases(names, 0.2, seed=0)
    assert len(s["validation"]) == 2 and sorted(s["train"] + s["validation"]) == sorted(names)
    assert s == labeled.split_cases(names, 0.2, seed=0) and s != labeled.split_cases(names, 0.2, seed=1)
    assert len(labeled.split_cases(["a", "b"], 0.1, seed=0)["validation"]) == 1


def test_candidate_csv(tmp_path):
    (tmp_path / "c.csv").write_text("volume,x,y,z,label\nscan1.nii.gz,10,20,5,1\n/abs/s.nii.gz,1,2,3,0\n")
    rows = labeled.read_candidates(tmp_path / "c.csv")
    assert rows[0].volume == tmp_path / "scan1.nii.gz"
    assert rows[0].centre == (10, 20, 5) and rows[0].label == 1
    assert str(rows[1].volume) == "/abs/s.nii.gz"
    (tmp_path / "bad.csv").write_text("volume,x,y,z,label\nscan1.nii.gz,10,twenty,5,1\n")
    with pytest.raises(DataError, match="bad.csv:2: expected volume,x,y,z,label"):
        labeled.read_candidates(tmp_path / "bad.csv")


def test_segment_cases_writes_masks_with_the_input_affine_and_a_report(nnunet, tmp_path):
    import jax.numpy as jnp

    from transvw_jax import predict

    ds = labeled.read_nnunet(nnunet)

    def background(x):  # predicts background everywhere: class-0 Dice high, class-1 Dice 0
        return jnp.stack([jnp.ones_like(x), jnp.zeros_like(x)], axis=-1)

    report = predict.segment_cases(background, ds.cases, ds.num_classes, (16, 16, 8), tmp_path / "out")
    for case in ds.cases:
        written = nib.load(tmp_path / "out" / "masks" / f"{case.name}.nii.gz")
        np.testing.assert_allclose(written.affine, nib.load(case.image).affine)
        assert written.shape == (32, 32, 16) and not np.asarray(written.dataobj).any()
        assert (tmp_path / "out" / "overlays" / f"{case.name}.png").is_file()
        assert report["cases"][case.name]["dice"][1] == 0.0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["summary"]["dice_class1"] == {"mean": 0.0, "sd": 0.0}
    assert 0.99 < saved["summary"]["dice_class0"]["mean"] < 1.0
    assert not list((tmp_path / "out").rglob(".*tmp*"))


def test_cases_read_in_either_orientation_stay_paired(tmp_path):
    """An LPS-like case: "ras" flips image and label alike, "reference" keeps both as stored."""
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1000, (12, 10, 8)).astype(np.int16)
    mask = np.zeros((12, 10, 8), np.uint8)
    mask[1:3, 2:4, 5] = 1
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])
    _write(tmp_path / "img.nii.gz", hu, affine)
    _write(tmp_path / "lab.nii.gz", mask, affine)
    case = labeled.Case("c", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")
    expected = (np.clip(hu, -1000, 1000).astype(np.float32) + 1000) / 2000
    image, label = labeled.load_case(case, 2, orientation="reference")
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_array_equal(label, mask)
    image, label = labeled.load_case(case, 2)  # "ras": x and y mirrored
    np.testing.assert_allclose(image, expected[::-1, ::-1], atol=1e-6)
    np.testing.assert_array_equal(label, mask[::-1, ::-1])
    ras = patches.cache_cases([case], 2, tmp_path / "cache")[0]
    np.testing.assert_array_equal(np.load(ras.label), mask[::-1, ::-1])
    ref = patches.cache_cases([case], 2, tmp_path / "cache", orientation="reference")[0]  # rebuilt
    np.testing.assert_array_equal(np.load(ref.label), mask)
    assert json.loads((tmp_path / "cache" / "c.json").read_text())["orientation"] == "reference"
