"""Read CT/MRI volumes into one float32 array per patient, normalised to [0, 1].

Axis conventions. Every array this module returns has axes (X, Y, Z): the first two index
the axial plane and the third the slice (cranio-caudal) direction, which is also how the
cubes, transforms and models of this package index their data. `spacing` is in mm per voxel
along the same three axes. Two orientations (`ORIENTATIONS`, the `orientation` argument):

* "ras" (the default): reoriented to the closest RAS+, as below, so two files of one patient
  stored in different orientations give the same array.
* "reference": the array as stored, only transposed to (X, Y, Z), never flipped: what the
  original TransVW / Models Genesis code does (SimpleITK, then `transpose(2, 1, 0)`), so
  cubes match the orientation their released weights were trained on. For a LUNA16 .mhd
  (LPS, identity direction) "ras" mirrors X and Y relative to it. `affine` still maps the
  returned voxels to RAS world millimetres.

Per format, in "ras":

* NIfTI (.nii, .nii.gz): reoriented with `nib.as_closest_canonical`, so the voxel axes run
  (as closely as the affine allows) towards Right, Anterior, Superior (RAS+). Two files of
  one patient saved in different orientations give the same array. `affine` is the
  voxel -> world (RAS, mm) matrix of the reoriented array.
* MetaImage (.mhd + .raw, e.g. LUNA16), through the optional SimpleITK: ITK arrays come out
  (Z, Y, X) and are transposed to (X, Y, Z); the LPS geometry (origin, direction, spacing)
  is converted to an RAS affine and the array reoriented to the closest RAS+ like NIfTI,
  so a scan reads the same whichever of the two formats it was stored in.
* NumPy (.npy): taken as already (X, Y, Z) with 1 mm spacing and no affine (None).

Reading (`read_raw`) keeps intensities as stored (HU for CT); `load_volume` adds the checks
(finite values, a minimum shape), an optional resampling to a common spacing and the
normalisation. Every failure caused by a file is a `DataError` whose one-line message starts
with the file's path, so a bad file in a directory of thousands is named, not a traceback.
`scan_volumes` validates a directory one volume at a time: self-discovery streams patients,
and a dataset of CTs does not fit in memory at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transvw_jax.errors import DataError

_log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii", ".npy", ".mhd")
NORMALIZATIONS = ("ct", "percentile", "none")
ORIENTATIONS = ("ras", "reference")  # see the module docstring

# LPS (ITK, DICOM) -> RAS (NIfTI) world coordinates: negate x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Volume:
    """One patient's volume: a float32 (X, Y, Z) array and where its voxels lie.

    Attributes:
      path: the file it was read from (for error messages and logs).
      array: float32, axes (X, Y, Z).
      spacing: mm per voxel along X, Y, Z (what `resample` reads and changes).
      affine: 4x4 voxel -> world (RAS, mm) matrix of `array` (after any reorientation and
        resampling); None where the file has no geometry (.npy).
    """

    path: Path
    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What `scan_volumes` found: the usable volumes and each skipped file with why."""

    paths: list[Path]
    skipped: list[tuple[Path, str]]


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The entry of SUFFIXES that `path` ends with (case-insensitive), else None.

    `Path.suffix` alone cannot tell ".nii.gz" from a stray ".gz", hence the string match.
    """
    name = Path(path).name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _short(e: BaseException, limit: int = 160) -> str:
    """A one-line reason from an exception: readers put file names and newlines in theirs."""
    lines = str(e).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _as_3d(path: Path, shape: Sequence[int]) -> tuple[int, ...]:
    """The 3D shape after dropping trailing singleton axes (an (X, Y, Z, 1) NIfTI is common)."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: not a 3D volume (shape {shape})")
    if min(shape) < 1:
        raise DataError(f"{path}: empty volume (shape {shape})")
    return shape


def _reorient_to_ras(array: np.ndarray, affine: np.ndarray,
                     spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Flip/transpose `array` to the closest RAS+ orientation, as nib.as_closest_canonical does.

    Returns the reoriented array (a view), its affine and its spacing (permuted with the axes).
    """
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    out = nio.apply_orientation(array, ornt)
    new_affine = affine @ nio.inv_ornt_aff(ornt, array.shape)
    new_spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        new_spacing[int(target)] = float(spacing[axis])
    return out, new_affine, (new_spacing[0], new_spacing[1], new_spacing[2])


def _mhd_volume(path: Path, array_zyx: np.ndarray, dimension: int, spacing: Sequence[float],
                origin: Sequence[float], direction: Sequence[float], orientation: str = "ras") -> Volume:
    """A Volume from what SimpleITK reads (kept free of SimpleITK so that it can be tested).

    Args:
      array_zyx: `sitk.GetArrayFromImage`: the `dimension` image axes reversed ((Z, Y, X) for
        3D), then any pixel-component axis.
      dimension, spacing, origin, direction: `GetDimension()`, `GetSpacing()`, `GetOrigin()`,
        `GetDirection()` (row-major `dimension` x `dimension`), all in ITK's (x, y, z) order.
      orientation: "ras" reorients to the closest RAS+; "reference" keeps ITK's (x, y, z)
        voxel order, as the original code's `transpose(2, 1, 0)` does.
    """
    if dimension < 3:  # checked first: (X, Y, components) would pass for 3D below
        raise DataError(f"{path}: not a 3D volume ({dimension}D image, shape {array_zyx.shape})")
    perm = list(reversed(range(dimension))) + list(range(dimension, array_zyx.ndim))
    array = array_zyx.transpose(perm)
    array = array.reshape(_as_3d(path, array.shape))
    d = np.asarray(direction, np.float64).reshape(dimension, dimension)[:3, :3]
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing[:3], np.float64)  # column i: step of voxel axis i
    lps[:3, 3] = np.asarray(origin[:3], np.float64)
    affine = _LPS_TO_RAS @ lps
    spacing3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    if orientation == "ras":
        array, affine, spacing3 = _reorient_to_ras(array, affine, spacing3)
    return Volume(path, _float32(path, array), spacing3, affine)


def _float32(path: Path, array: np.ndarray, copy: bool = False) -> np.ndarray:
    """A C-contiguous float32 array; `copy` forces one (to leave a memory-mapped file behind)."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported voxel type {array.dtype}")
    if copy:
        return np.array(array, dtype=np.float32, order="C", copy=True)
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_nifti(path: Path, orientation: str) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(path)
        header_shape = image.shape
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError, ValueError, ...
        raise DataError(f"{path}: unreadable ({_short(e)})") from e
    _as_3d(path, header_shape)  # before reorienting, which fails on 2D data with a worse message
    try:
        # NIfTI stores (i, j, k) = (X, Y, Z) already: "reference" needs no transpose.
        canonical = nib.as_closest_canonical(image) if orientation == "ras" else image
        array = canonical.get_fdata(dtype=np.float32, caching="unchanged")
        zooms = canonical.header.get_zooms()[:3]
        affine = np.array(canonical.affine, np.float64)
    except Exception as e:  # truncated or corrupt data only shows when the voxels are read
        raise DataError(f"{path}: unreadable ({_short(e)})") from e
    array = array.reshape(_as_3d(path, array.shape))  # the reoriented shape: axes may be permuted
    spacing = (float(zooms[0]), float(zooms[1]), float(zooms[2]))
    return Volume(path, _float32(path, array), spacing, affine)


def _read_npy(path: Path) -> Volume:
    try:
        # Mapped, so an int16 file is converted to float32 without a second full copy.
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: unreadable ({_short(e)})") from e
    if not isinstance(mapped, np.ndarray):  # an .npz renamed to .npy loads as an archive
        raise DataError(f"{path}: unreadable (not a single array)")
    shape = _as_3d(path, mapped.shape)
    try:
        array = _float32(path, mapped.reshape(shape), copy=True)
    except OSError as e:
        raise DataError(f"{path}: unreadable ({_short(e)})") from e
    finally:
        del mapped
    return Volume(path, array, (1.0, 1.0, 1.0), None)


def _itk_reason(e: BaseException, limit: int = 160) -> str:
    """The informative part of a SimpleITK error, on one line.

    Its first line only names the C++ source location; the reason follows, prefixed with the
    object that raised it ("ITK ERROR: MetaImageIO(0x...): " or "sitk::ERROR: ").
    """
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    lines = [re.sub(r"^(ITK ERROR: \S+: |sitk::ERROR: )", "", ln) for ln in lines]
    text = "; ".join(lines)
    if not text:
        return _short(e, limit)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_mhd(path: Path, orientation: str) -> Volume:
    try:
        import SimpleITK as sitk
    except ImportError as e:
        raise DataError(f"{path}: reading .mhd/.raw needs SimpleITK: pip install 'transvw-jax[itk]'") from e
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        dimension = image.GetDimension()
        geometry = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
    except Exception as e:  # SimpleITK raises RuntimeError with a multi-line ITK message
        raise DataError(f"{path}: unreadable ({_itk_reason(e)})") from e
    return _mhd_volume(path, array, dimension, *geometry, orientation=orientation)


def read_raw(path: str | os.PathLike, orientation: str = "ras") -> Volume:
    """Read a volume with its intensities as stored (HU for CT), as float32 (X, Y, Z).

    The orientation ("ras" or "reference") and spacing conventions per format are in the
    module docstring. A file that cannot be read, is not 3D or has an unknown suffix raises
    DataError naming it; an unknown `orientation` raises ValueError (a caller's bug).
    """
    _check_orientation(orientation)
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise DataError(f"{path}: unknown volume format (expected one of {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise DataError(f"{path}: unreadable (no such file)")
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(path, orientation)
    if suffix == ".npy":
        return _read_npy(path)
    return _read_mhd(path, orientation)


def normalize_ct(a: np.ndarray, hu_min: float = -1000.0, hu_max: float = 1000.0) -> np.ndarray:
    """Clip to the HU window [hu_min, hu_max] and scale it linearly to [0, 1] (float32).

    A fixed window rather than per-volume statistics keeps one HU value at one intensity in
    every patient, which is what makes CT visual words comparable across patients.
    """
    if not hu_max > hu_min:
        raise ValueError(f"normalize_ct: hu_max ({hu_max}) must exceed hu_min ({hu_min})")
    out = np.clip(np.asarray(a, np.float32), np.float32(hu_min), np.float32(hu_max))
    out -= np.float32(hu_min)
    out /= np.float32(hu_max) - np.float32(hu_min)
    return out


def normalize_percentile(a: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Clip to the volume's [lower, upper] percentiles and scale them to [0, 1] (float32).

    For MRI, whose intensities have no physical unit and vary by scanner and sequence; the
    percentiles (not min/max) ignore the few outlier voxels. A constant volume gives zeros.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"normalize_percentile: need 0 <= lower < upper <= 100, got {lower}, {upper}")
    a = np.asarray(a, np.float32)
    lo, hi = (np.float32(v) for v in np.percentile(a, [lower, upper]))
    span = hi - lo
    if not span > 0:
        return np.zeros(a.shape, np.float32)
    out = np.clip(a, lo, hi)
    out -= lo
    out /= span
    np.clip(out, 0.0, 1.0, out=out)  # float32 rounding cannot push past 1, but keep the promise cheap
    return out


def _normalize(array: np.ndarray, normalization: str) -> np.ndarray:
    if normalization == "ct":
        return normalize_ct(array)
    if normalization == "percentile":
        return normalize_percentile(array)
    return array


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}")


def _check_orientation(orientation: str) -> None:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")


def _spacing3(spacing: Sequence[float], what: str) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{what}: need 3 positive finite spacings (mm), got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def resample(volume: Volume, spacing: tuple[float, float, float], order: int = 1) -> Volume:
    """Resample to `spacing` (mm per voxel along X, Y, Z), linear interpolation by default.

    Scans come with different voxel sizes; resampling them to one spacing makes a 64-voxel
    cube cover the same anatomy in every patient. The output shape is round(shape * old /
    new), at least 1 per axis. Voxel (0, 0, 0) keeps its position, so output voxel i lies at
    input coordinate i * new / old, and the affine's columns are scaled by new / old (its
    translation unchanged). Samples past the last input voxel take the edge value.
    Deterministic: a pure function of the input.
    """
    from scipy import ndimage

    new = _spacing3(spacing, "resample")
    try:
        old = _spacing3(volume.spacing, "resample")
    except ValueError as e:
        raise DataError(f"{volume.path}: invalid voxel spacing {tuple(volume.spacing)} in the header") from e
    ratio = np.asarray(new) / np.asarray(old)  # input voxels per output voxel
    shape = tuple(max(1, int(np.floor(n / r + 0.5))) for n, r in zip(volume.array.shape, ratio, strict=True))
    if shape == volume.array.shape and np.allclose(ratio, 1.0):
        array = np.array(volume.array, np.float32, copy=True)
    else:
        array = ndimage.affine_transform(np.asarray(volume.array, np.float32), ratio, offset=0.0,
                                         output_shape=shape, output=np.float32, order=order,
                                         mode="nearest")
    affine = None
    if volume.affine is not None:
        affine = np.array(volume.affine, np.float64, copy=True)
        affine[:3, :3] = affine[:3, :3] * ratio
    return Volume(volume.path, array, new, affine)


def load_volume(path: str | os.PathLike, *, normalization: str = "ct",
                spacing: tuple[float, float, float] | None = None,
                min_shape: Sequence[int] | None = None, orientation: str = "ras") -> Volume:
    """Read, check, optionally resample and normalise one volume for training.

    Steps: `read_raw` in `orientation`; reject NaN/Inf (they would poison every cube and loss they touch);
    `resample` to `spacing` if given; reject a volume smaller than `min_shape` on any axis
    (no cube of that size can be cropped from it); normalise with `normalization` ("ct": HU
    window to [0, 1], "percentile": MRI, "none": as stored).

    Raises:
      DataError: the file is unreadable or unusable (the message starts with its path).
      ValueError: `normalization`, `spacing`, `min_shape` or `orientation` is invalid (a
        caller's bug).
    """
    _check_normalization(normalization)
    _check_orientation(orientation)
    if spacing is not None:
        spacing = _spacing3(spacing, "load_volume")
    cube = None if min_shape is None else _min_shape3(min_shape)
    volume = read_raw(path, orientation)
    # A float64 sum is finite iff every voxel is (no CT/MRI sum reaches 1e308), without
    # allocating a boolean mask the size of the volume.
    if not np.isfinite(volume.array.sum(dtype=np.float64)):
        raise DataError(f"{volume.path}: contains NaN or Inf values")
    if spacing is not None:
        volume = resample(volume, spacing)
    if cube is not None and any(s < c for s, c in zip(volume.array.shape, cube, strict=True)):
        raise DataError(f"{volume.path}: shape {tuple(volume.array.shape)} smaller than the cube {cube}")
    return dataclasses.replace(volume, array=_normalize(volume.array, normalization))


def _min_shape3(min_shape: Sequence[int]) -> tuple[int, int, int]:
    values = tuple(int(s) for s in min_shape)
    if len(values) != 3:
        raise ValueError(f"min_shape: need 3 sizes (X, Y, Z), got {tuple(min_shape)}")
    return values  # type: ignore[return-value]


def list_volume_files(directory: str | os.PathLike) -> list[Path]:
    """The volume files directly in `directory`, sorted by path.

    Hidden files and other suffixes are ignored; a .raw is the data of its .mhd, not a
    volume of its own. Raises DataError when `directory` is missing or not a directory.
    """
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    return sorted(p for p in directory.iterdir()
                  if not p.name.startswith(".") and volume_suffix(p) is not None and p.is_file())


def scan_volumes(directory: str | os.PathLike, *, min_shape: Sequence[int] | None = None,
                 normalization: str = "ct", spacing: tuple[float, float, float] | None = None,
                 log: bool = True, orientation: str = "ras") -> ScanResult:
    """Check which volumes of `directory` are usable, loading one at a time.

    Each file goes through `load_volume` with the same arguments training will use, so a
    volume that would fail there is skipped here, with its reason, before hours of work;
    only one volume is in memory at a time. Skipped files are logged as warnings (unless
    `log` is False) and returned in `ScanResult.skipped`.

    Raises:
      DataError: `directory` does not exist, holds no volume files, or none of them is usable.
      ValueError: invalid `normalization`, `spacing`, `min_shape` or `orientation`.
    """
    _check_normalization(normalization)
    _check_orientation(orientation)
    if spacing is not None:
        spacing = _spacing3(spacing, "scan_volumes")
    if min_shape is not None:
        min_shape = _min_shape3(min_shape)
    directory = Path(directory)
    files = list_volume_files(directory)
    if not files:
        raise DataError(f"{directory}: no volumes (.nii, .nii.gz, .npy, .mhd)")
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            load_volume(path, normalization=normalization, spacing=spacing, min_shape=min_shape,
                        orientation=orientation)
        except DataError as e:
            reason = str(e).removeprefix(f"{path}: ")
            skipped.append((path, reason))
            if log:
                _log.warning("skipping %s: %s", path, reason)
            continue
        paths.append(path)
    if not paths:
        first, reason = skipped[0]
        raise DataError(f"{directory}: none of the {len(files)} volumes is usable; first: {first}: {reason}")
    return ScanResult(paths, skipped)

