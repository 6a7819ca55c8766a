"""Embedded chest phantoms: reproducible, CT-like, varying between patients and along z,
and written as NIfTI files that read back unchanged."""

import nibabel as nib
import numpy as np
import pytest

from transvw_jax.data.synthetic import Phantom, make_phantom, write_phantoms

SHAPE = (48, 48, 24)
SPACING = (2.5, 2.5, 5.0)


def lung_voxels(hu: np.ndarray) -> np.ndarray:
    return (hu >= -900) & (hu <= -700)


def test_same_index_and_seed_give_identical_phantoms():
    a = make_phantom(3, shape=SHAPE, seed=1)
    b = make_phantom(3, shape=SHAPE, seed=1)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.nodules, b.nodules)
    assert not np.array_equal(a.hu, make_phantom(4, shape=SHAPE, seed=1).hu)
    assert not np.array_equal(a.hu, make_phantom(3, shape=SHAPE, seed=2).hu)


@pytest.mark.parametrize("shape", [SHAPE, (40, 56, 20), (128, 128, 64)])
def test_dtype_shape_and_hu_range(shape):
    p = make_phantom(0, shape=shape, spacing=SPACING)
    assert isinstance(p, Phantom)
    assert p.hu.dtype == np.int16 and p.hu.shape == shape
    assert p.nodules.dtype == np.uint8 and p.nodules.shape == shape
    assert set(np.unique(p.nodules)) <= {0, 1}
    assert p.hu.min() >= -1024 and p.hu.max() <= 3071
    assert p.spacing == SPACING


@pytest.mark.parametrize("index", [0, 1, 2, 5])
def test_tissue_fractions_are_chest_like(index):
    p = make_phantom(index, shape=SHAPE)
    hu = p.hu
    assert 0.3 < (hu < -900).mean() < 0.8          # air around the body
    assert 0.03 < lung_voxels(hu).mean() < 0.25     # lungs
    assert 0.15 < (hu > -500).mean() < 0.6          # fat, soft tissue, bone
    bone = (hu > 300).mean()
    assert 0.002 < bone < 0.08                      # spine, ribs: present, not dominant
    # the nodule mask is non-empty, solid tissue, and sits in the lungs (lung close around it)
    mask = p.nodules.astype(bool)
    assert mask.any()
    assert (hu[mask] > -300).all()
    near = np.zeros_like(mask)
    for x, y, z in np.argwhere(mask):
        near[max(x - 3, 0):x + 4, max(y - 3, 0):y + 4, max(z - 2, 0):z + 3] = True
    assert lung_voxels(hu[near & ~mask]).mean() > 0.2


def test_anatomy_differs_along_z():
    for index in range(3):
        hu = make_phantom(index, shape=SHAPE).hu
        area = lung_voxels(hu).sum(axis=(0, 1))
        lower, upper = area[int(0.3 * SHAPE[2])], area[int(0.85 * SHAPE[2])]
        assert lower > 2 * upper > 0                # lungs taper towards the apex
        assert area.argmax() not in (0, SHAPE[2] - 1)   # domed below, tapered above
        assert area[0] < 0.2 * area.max()           # diaphragm / abdomen at the bottom


def test_patients_vary_within_a_plausible_range():
    phantoms = [make_phantom(i, shape=SHAPE) for i in range(6)]
    tissue = np.array([(p.hu > -500).mean() for p in phantoms])
    lungs = np.array([lung_voxels(p.hu).mean() for p in phantoms])
    assert len(np.unique(tissue)) == len(phantoms) and len(np.unique(lungs)) == len(phantoms)
    assert tissue.max() / tissue.min() > 1.05 and lungs.max() / lungs.min() > 1.05
    assert ((tissue > 0.15) & (tissue < 0.6)).all() and ((lungs > 0.03) & (lungs < 0.25)).all()
    nodule_sizes = [int(p.nodules.sum()) for p in phantoms]
    assert len(set(nodule_sizes)) > 1


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        make_phantom(-1, shape=SHAPE)
    with pytest.raises(ValueError):
        make_phantom(0, shape=(48, 48, 4))
    with pytest.raises(ValueError):
        make_phantom(0, shape=SHAPE, spacing=(1.0, 0.0, 1.0))


def test_write_phantoms_round_trip(tmp_path):
    out = tmp_path / "new" / "volumes"
    paths = write_phantoms(out, 3, shape=SHAPE, seed=4, spacing=SPACING)
    assert paths == [out / f"phantom_{i:04d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in paths]   # no masks, no temporaries
    for i, path in enumerate(paths):
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.int16
        np.testing.assert_array_equal(data, make_phantom(i, shape=SHAPE, seed=4).hu)
        np.testing.assert_allclose(img.affine, np.diag([*SPACING, 1.0]))
        canonical = nib.as_closest_canonical(img)
        np.testing.assert_array_equal(np.asanyarray(canonical.dataobj), data)
        np.testing.assert_allclose(img.header.get_zooms(), SPACING)


def test_write_phantoms_with_masks_and_rewrite(tmp_path):
    paths = write_phantoms(tmp_path, 2, shape=SHAPE, masks=True)
    first = [p.read_bytes() for p in paths]
    masks = sorted((tmp_path / "masks").iterdir())
    assert [m.name for m in masks] == [p.name for p in paths]
    for i, m in enumerate(masks):
        img = nib.load(m)
        data = np.asanyarray(img.dataobj)
        assert data.dtype == np.uint8
        np.testing.assert_array_equal(data, make_phantom(i, shape=SHAPE).nodules)
        np.testing.assert_allclose(img.affine, np.diag([*SPACING, 1.0]))
    # writing again replaces the files in place, byte for byte, and leaves nothing behind
    assert write_phantoms(tmp_path, 2, shape=SHAPE, masks=True) == paths
    assert [p.read_bytes() for p in paths] == first
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
