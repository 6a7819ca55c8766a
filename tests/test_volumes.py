"""Volume reading: orientation, spacing, normalisation, resampling and one-line DataErrors."""

import dataclasses
import gzip
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from transvw_jax.data import volumes as V
from transvw_jax.errors import DataError

SHAPE = (20, 18, 12)


def ramp(shape=SHAPE, dtype=np.float32) -> np.ndarray:
    """Distinct values per voxel, so any flip or transpose shows."""
    return np.arange(np.prod(shape)).reshape(shape).astype(dtype)


def save_nifti(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def world(affine, ijk):
    return (affine @ np.append(np.asarray(ijk, np.float64), 1.0))[:3]


def raises_data_error(path, call, *args, **kwargs) -> str:
    """The message of the DataError `call` raises: one line that names `path`."""
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_nifti_with_flipped_x_reads_canonical_ras(tmp_path):
    data = ramp(dtype=np.int16)
    affine = np.array([[-2.0, 0, 0, 40], [0, 1.5, 0, -10], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    path = save_nifti(tmp_path / "flip.nii", data, affine)
    volume = V.read_raw(str(path))
    assert volume.path == path
    assert volume.array.dtype == np.float32 and volume.array.flags.c_contiguous
    np.testing.assert_array_equal(volume.array, data[::-1].astype(np.float32))
    assert volume.spacing == (2.0, 1.5, 3.0)
    np.testing.assert_allclose(volume.affine[:3, :3], np.diag([2.0, 1.5, 3.0]))
    # The same voxel lies at the same world position before and after the flip.
    for i, j, k in [(0, 0, 0), (19, 17, 11), (3, 5, 7)]:
        np.testing.assert_allclose(world(volume.affine, (i, j, k)), world(affine, (19 - i, j, k)))


def test_nifti_with_permuted_axes_permutes_array_and_spacing(tmp_path):
    data = ramp()
    # Voxel axis 0 runs along world y (posterior), axis 1 along world x.
    affine = np.array([[0, 1.5, 0, 0], [-2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    volume = V.read_raw(save_nifti(tmp_path / "perm.nii.gz", data, affine))
    np.testing.assert_array_equal(volume.array, data[::-1].transpose(1, 0, 2))
    assert volume.array.shape == (18, 20, 12)
    assert volume.spacing == (1.5, 2.0, 3.0)


def test_nifti_gz_and_npy_round_trip(tmp_path):
    data = np.random.default_rng(0).normal(0, 300, SHAPE).astype(np.float32)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    volume = V.read_raw(save_nifti(tmp_path / "a.nii.gz", data, affine))
    np.testing.assert_array_equal(volume.array, data)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.7, 2.5), rtol=1e-6)
    np.testing.assert_allclose(volume.affine, affine, rtol=1e-6)

    np.save(tmp_path / "b.npy", data.astype(np.int16))
    volume = V.read_raw(tmp_path / "b.npy")
    np.testing.assert_array_equal(volume.array, data.astype(np.int16).astype(np.float32))
    assert volume.array.dtype == np.float32 and volume.spacing == (1.0, 1.0, 1.0) and volume.affine is None
    assert type(volume.array) is np.ndarray and volume.array.flags.writeable  # a copy, not the mapped file


def test_trailing_singleton_axes_are_squeezed(tmp_path):
    data = ramp()[..., None]
    volume = V.read_raw(save_nifti(tmp_path / "t.nii.gz", data, np.eye(4)))
    np.testing.assert_array_equal(volume.array, data[..., 0])
    np.save(tmp_path / "t.npy", data[..., None])
    assert V.read_raw(tmp_path / "t.npy").array.shape == SHAPE


def test_normalize_ct_window():
    hu = np.array([-3000, -1000, -500, 0, 500, 1000, 3000], np.int16)
    out = V.normalize_ct(hu)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [0, 0, 0.25, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(V.normalize_ct(np.array([0.0, 100.0]), hu_min=-100, hu_max=100), [0.5, 1])
    with pytest.raises(ValueError):
        V.normalize_ct(hu, hu_min=10, hu_max=10)


def test_normalize_percentile_range_outliers_and_constant():
    a = np.random.default_rng(1).normal(100, 20, SHAPE).astype(np.float32)
    a[0, 0, 0], a[1, 1, 1] = 1e6, -1e6  # outliers beyond the 0.5/99.5 percentiles
    out = V.normalize_percentile(a)
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[0, 0, 0] == 1.0 and out[1, 1, 1] == 0.0
    lo, hi = np.percentile(a, [0.5, 99.5])
    mid = (2, 3, 4)
    np.testing.assert_allclose(out[mid], np.clip((a[mid] - lo) / (hi - lo), 0, 1), atol=1e-6)
    # Order is kept: a monotone map.
    flat, norm = a.ravel(), out.ravel()
    order = np.argsort(flat)
    assert np.all(np.diff(norm[order]) >= 0)

    const = V.normalize_percentile(np.full(SHAPE, 7.0, np.float32))
    assert const.dtype == np.float32 and not const.any()


def test_resample_shape_and_linear_ramp():
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    values = 3.0 * x - 2.0 * y + 0.5 * z
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (5, 6, 7)
    volume = V.Volume(Path("r.npy"), values, (1.0, 1.0, 1.0), affine)
    out = V.resample(volume, (2.0, 1.0, 0.5))
    assert out.array.shape == (10, 18, 24) and out.array.dtype == np.float32
    assert out.spacing == (2.0, 1.0, 0.5)
    np.testing.assert_allclose(out.affine, [[2, 0, 0, 5], [0, 1, 0, 6], [0, 0, 0.5, 7], [0, 0, 0, 1]])
    # Output voxel (i, j, k) samples input coordinate (2i, j, k/2): the ramp stays exactly linear
    # wherever that lies inside the input (k/2 <= 11).
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (10, 18, 23)), indexing="ij")
    np.testing.assert_allclose(out.array[:, :, :23], 3.0 * 2 * i - 2.0 * j + 0.5 * k / 2, atol=1e-4)
    np.testing.assert_array_equal(V.resample(volume, (2.0, 1.0, 0.5)).array, out.array)  # deterministic
    # Rounding and the lower bound of one voxel.
    assert V.resample(volume, (3.0, 100.0, 0.8)).array.shape == (7, 1, 15)
    assert V.resample(dataclasses.replace(volume, affine=None), (2.0, 2.0, 2.0)).affine is None


def test_load_volume_resamples_then_checks_then_normalises(tmp_path):
    data = np.full(SHAPE, 0.0, np.float32)
    data[10:] = 1000.0
    path = save_nifti(tmp_path / "ct.nii.gz", data, np.diag([0.5, 0.5, 2.0, 1]))
    volume = V.load_volume(path, spacing=(1.0, 1.0, 1.0), min_shape=(10, 9, 24))
    assert volume.array.shape == (10, 9, 24) and volume.spacing == (1.0, 1.0, 1.0)
    assert volume.array.dtype == np.float32 and volume.array.min() == 0.5 and volume.array.max() == 1.0
    raw = V.load_volume(path, normalization="none")
    np.testing.assert_array_equal(raw.array, data)
    mri = V.load_volume(path, normalization="percentile")
    assert mri.array.min() == 0.0 and mri.array.max() == 1.0
    with pytest.raises(ValueError, match="zscore"):
        V.load_volume(path, normalization="zscore")


def test_corrupt_and_truncated_files_raise_data_error(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", ramp(), np.eye(4)).read_bytes()
    random = tmp_path / "random.nii.gz"
    random.write_bytes(np.random.default_rng(0).bytes(600))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good[: len(good) // 2])
    short = tmp_path / "short.nii"
    short.write_bytes(gzip.decompress(good)[:2000])
    np.save(tmp_path / "full.npy", ramp())
    short_npy = tmp_path / "short.npy"
    short_npy.write_bytes((tmp_path / "full.npy").read_bytes()[:500])
    for path in (random, truncated, short, short_npy):
        assert "unreadable" in raises_data_error(path, V.read_raw, path)
    missing = tmp_path / "missing.nii.gz"
    assert "unreadable" in raises_data_error(missing, V.load_volume, missing)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    raises_data_error(other, V.read_raw, other)


def test_unusable_volumes_raise_data_error(tmp_path):
    flat = save_nifti(tmp_path / "flat.nii.gz", ramp((20, 18)), np.eye(4))
    assert "not a 3D volume" in raises_data_error(flat, V.read_raw, flat)
    np.save(tmp_path / "rgb.npy", ramp((20, 18, 12, 3)))
    assert "not a 3D volume" in raises_data_error(tmp_path / "rgb.npy", V.read_raw, tmp_path / "rgb.npy")

    tiny = save_nifti(tmp_path / "tiny.nii.gz", ramp((8, 8, 4)), np.eye(4))
    message = raises_data_error(tiny, V.load_volume, tiny, min_shape=(16, 16, 8))
    assert message.endswith("shape (8, 8, 4) smaller than the cube (16, 16, 8)")

    nan = ramp()
    nan[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    message = raises_data_error(tmp_path / "nan.npy", V.load_volume, tmp_path / "nan.npy")
    assert message.endswith("contains NaN or Inf values")


def test_mhd_without_simpleitk_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # import fails, installed or not
    path = tmp_path / "scan.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\n")
    message = raises_data_error(path, V.read_raw, path)
    assert "needs SimpleITK" in message and "transvw-jax[itk]" in message


def test_mhd_geometry_lps_to_ras_without_simpleitk():
    data = ramp()
    array_zyx = data.transpose(2, 1, 0)  # what sitk.GetArrayFromImage returns
    origin = (-100.0, -50.0, 30.0)
    volume = V._mhd_volume(Path("s.mhd"), array_zyx, 3, (0.7, 0.8, 2.5), origin, np.eye(3).ravel())
    # Identity direction in LPS: x grows to the left and y to the back, so RAS+ flips both.
    np.testing.assert_array_equal(volume.array, data[::-1, ::-1])
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5))
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(world(volume.affine, (19, 17, 0)), lps_to_ras * origin)
    far_corner = (origin[0] + 19 * 0.7, origin[1] + 17 * 0.8, origin[2] + 11 * 2.5)
    np.testing.assert_allclose(world(volume.affine, (0, 0, 11)), lps_to_ras * far_corner)
    with pytest.raises(DataError, match="not a 3D volume"):
        V._mhd_volume(Path("s.mhd"), ramp((18, 20, 1)), 2, (1, 1), (0, 0), (1, 0, 0, 1))


def _write_mhd(sitk, path: Path, data: np.ndarray) -> Path:
    """`data` (X, Y, Z) as an .mhd/.raw pair with SimpleITK's default (identity) direction."""
    image = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-100.0, -50.0, 30.0))
    sitk.WriteImage(image, str(path))
    return path


def test_mhd_round_trip_with_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = ramp(dtype=np.int16)
    path = _write_mhd(sitk, tmp_path / "scan.mhd", data)
    assert list(tmp_path.glob("scan.*raw"))
    volume = V.read_raw(path)
    np.testing.assert_array_equal(volume.array, data[::-1, ::-1].astype(np.float32))
    np.testing.assert_allclose(volume.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    # The same scan as NIfTI (RAS affine of the ITK geometry) reads identically.
    nifti = V.read_raw(save_nifti(tmp_path / "scan.nii.gz", data, np.diag([-0.7, -0.8, 2.5, 1.0])))
    np.testing.assert_array_equal(nifti.array, volume.array)
    assert V.scan_volumes(tmp_path, log=False).paths == [path, tmp_path / "scan.nii.gz"]
    for raw in tmp_path.glob("scan.*raw"):
        raw.unlink()
    assert "unreadable" in raises_data_error(path, V.read_raw, path)


def test_scan_volumes_keeps_good_files_and_explains_skipped(tmp_path, caplog):
    ct = ramp() * 10 - 1000
    save_nifti(tmp_path / "b_good.nii.gz", ct, np.eye(4))
    np.save(tmp_path / "a_good.npy", ct)
    save_nifti(tmp_path / "c_tiny.nii", ramp((8, 8, 4)), np.eye(4))
    (tmp_path / "d_corrupt.nii.gz").write_bytes(b"not a gzip file at all")
    nan = ct.copy()
    nan[0, 0, 0] = np.inf
    np.save(tmp_path / "e_nan.npy", nan)
    # Not volumes: hidden files, other suffixes, a .raw (data of an .mhd) and a folder.
    np.save(tmp_path / ".hidden.npy", ct)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.raw").write_bytes(b"\0" * 16)
    (tmp_path / "sub.nii.gz").mkdir()
    with caplog.at_level(logging.WARNING):
        result = V.scan_volumes(tmp_path, min_shape=(16, 16, 8))
    assert result.paths == [tmp_path / "a_good.npy", tmp_path / "b_good.nii.gz"]
    reasons = dict(result.skipped)
    assert list(reasons) == [tmp_path / "c_tiny.nii", tmp_path / "d_corrupt.nii.gz", tmp_path / "e_nan.npy"]
    assert reasons[tmp_path / "c_tiny.nii"] == "shape (8, 8, 4) smaller than the cube (16, 16, 8)"
    assert reasons[tmp_path / "d_corrupt.nii.gz"].startswith("unreadable (")
    assert reasons[tmp_path / "e_nan.npy"] == "contains NaN or Inf values"
    assert all("\n" not in r for r in reasons.values())
    for path, reason in result.skipped:
        assert any(str(path) in rec.getMessage() and reason in rec.getMessage() for rec in caplog.records)

    caplog.clear()
    V.scan_volumes(tmp_path, min_shape=(16, 16, 8), log=False)
    assert not caplog.records


def test_scan_volumes_directory_errors(tmp_path):
    missing = tmp_path / "missing"
    assert "no such directory" in raises_data_error(missing, V.scan_volumes, missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    message = raises_data_error(empty, V.scan_volumes, empty)
    assert message == f"{empty}: no volumes (.nii, .nii.gz, .npy, .mhd)"

    bad = tmp_path / "bad"
    bad.mkdir()
    save_nifti(bad / "a_flat.nii.gz", ramp((20, 18)), np.eye(4))
    (bad / "b_corrupt.npy").write_bytes(b"garbage")
    message = raises_data_error(bad, V.scan_volumes, bad, log=False)
    assert message.startswith(f"{bad}: none of the 2 volumes is usable; first: {bad / 'a_flat.nii.gz'}: ")
    assert "not a 3D volume" in message
    with pytest.raises(ValueError, match="zscore"):
        V.scan_volumes(bad, normalization="zscore")


# An LPS-like NIfTI: voxel x grows to the Right-to-Left (-x in RAS), y to the back (-y), as a
# DICOM/ITK scan converted without reorientation; z is the slice axis, growing superior.
LPS_LIKE = np.array([[-0.7, 0, 0, 100.0], [0, -0.8, 0, 50.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def test_nifti_reference_orientation_keeps_the_stored_array(tmp_path):
    data = ramp(dtype=np.int16)
    path = save_nifti(tmp_path / "lps.nii.gz", data, LPS_LIKE)
    ras = V.read_raw(path)  # the default
    np.testing.assert_array_equal(ras.array, data[::-1, ::-1].astype(np.float32))
    ref = V.read_raw(path, orientation="reference")
    np.testing.assert_array_equal(ref.array, data.astype(np.float32))
    assert ref.array.dtype == np.float32 and ref.array.flags.c_contiguous
    np.testing.assert_allclose(ref.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_allclose(ref.affine, LPS_LIKE, rtol=1e-6)  # still voxel -> RAS world
    # One voxel, one world position, in either orientation: ref (i, j, k) = ras (19-i, 17-j, k).
    np.testing.assert_allclose(world(ref.affine, (2, 3, 4)), world(ras.affine, (17, 14, 4)), atol=1e-4)
    # Permuted axes stay unpermuted in "reference".
    perm = np.array([[0, 1.5, 0, 0], [-2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])
    ref = V.read_raw(save_nifti(tmp_path / "perm.nii", data, perm), "reference")
    np.testing.assert_array_equal(ref.array, data.astype(np.float32))
    assert ref.spacing == (2.0, 1.5, 3.0)
    loaded = V.load_volume(path, normalization="none", orientation="reference", spacing=(1.4, 0.8, 2.5))
    assert loaded.array.shape == (10, 18, 12)
    np.testing.assert_array_equal(loaded.array[:, :, 0], data[::2, :, 0].astype(np.float32))


def test_mhd_reference_orientation_is_the_transposed_itk_array():
    data = ramp()
    array_zyx = data.transpose(2, 1, 0)
    direction = np.diag([1.0, 1.0, -1.0]).ravel()  # slices stacked towards the feet
    args = (Path("s.mhd"), array_zyx, 3, (0.7, 0.8, 2.5), (-100.0, -50.0, 30.0), direction)
    ref = V._mhd_volume(*args, orientation="reference")
    np.testing.assert_array_equal(ref.array, data)  # GetArrayFromImage(...).transpose(2, 1, 0)
    np.testing.assert_allclose(ref.spacing, (0.7, 0.8, 2.5))
    np.testing.assert_allclose(ref.affine[:3, :3], np.diag([-0.7, -0.8, -2.5]))
    np.testing.assert_allclose(world(ref.affine, (0, 0, 0)), (100.0, 50.0, 30.0))
    # LPS x, y and a caudal z: all three axes run against RAS+, so "ras" flips all three.
    np.testing.assert_array_equal(V._mhd_volume(*args).array, data[::-1, ::-1, ::-1])


def test_mhd_reference_orientation_with_simpleitk(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    data = ramp(dtype=np.int16)
    path = _write_mhd(sitk, tmp_path / "scan.mhd", data)
    ref = V.read_raw(path, orientation="reference")
    np.testing.assert_array_equal(ref.array, data.astype(np.float32))
    # As the original code reads it: ReadImage -> GetArrayFromImage -> transpose(2, 1, 0).
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0)
    np.testing.assert_array_equal(ref.array, original)
    np.testing.assert_allclose(ref.spacing, (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_array_equal(V.read_raw(path, "ras").array, data[::-1, ::-1].astype(np.float32))
    # The same scan as an LPS-like NIfTI reads identically in "reference" too.
    nifti = save_nifti(tmp_path / "scan.nii.gz", data, np.diag([-0.7, -0.8, 2.5, 1.0]))
    nifti = V.read_raw(nifti, "reference")
    np.testing.assert_array_equal(nifti.array, ref.array)
    result = V.scan_volumes(tmp_path, orientation="reference", log=False)
    assert result.paths == [path, tmp_path / "scan.nii.gz"] and not result.skipped


def test_unknown_orientation_is_a_value_error(tmp_path):
    np.save(tmp_path / "a.npy", ramp())
    for call in (V.read_raw, V.load_volume):
        with pytest.raises(ValueError, match="orientation 'lps'"):
            call(tmp_path / "a.npy", orientation="lps")
    with pytest.raises(ValueError, match="orientation"):
        V.scan_volumes(tmp_path, orientation="LPS")
