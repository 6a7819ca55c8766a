"""Procedural chest-CT phantoms in Hounsfield units: the project's embedded data.

These are toy data for demos and tests, not for any clinical claim. They exist so that
self-discovery and pretraining can run end to end without downloading a dataset, and so
tests have volumes whose content is known.

Self-discovery looks for *recurring anatomy across patients*: an auto-encoder embeds each
patient, nearest patients are grouped, and cubes cut at the same coordinate in those patients
become one "visual word". For that to find anything the phantoms share one anatomy whose
parameters vary smoothly between patients, and the anatomy differs along z so that different
coordinates look different.

Axes and orientation: arrays are indexed [x, y, z] with X = patient right (+) / left (-),
Y = anterior (+) / posterior (-), Z = superior (+) / inferior (-), i.e. RAS+ with positive axis
directions; `write_phantoms` stores them with affine diag(spacing, 1), so a reader that
reorients to the closest canonical (RAS+) gets the same array back.

Anatomy, painted back to front on a float32 HU canvas:

* air outside the body (-1000 HU);
* the body: a slightly boxy ellipse with a subcutaneous fat rim (~-100 HU) around muscle
  (~+45 HU); inside the rib cage the mediastinum is fat, the abdomen below the diaphragm is
  soft tissue with the liver on the right (+60 HU) and a gastric air bubble on the left;
* two lungs (~-800 HU, denser posteriorly), domed at the bottom by the diaphragm (the right
  dome higher), tapering to rounded apices, carved medially by the mediastinum, the heart
  and the spine; vessel trees (~+40 HU) branch from each hilum;
* the airway: a trachea (air lumen, soft-tissue wall) in the upper mediastinum splitting at
  the carina into two main bronchi (the right one shorter and steeper) and lobar bronchi;
* the heart (+40 HU, epicardial fat rim) in the lower slices, anterior and slightly left,
  and the aorta (ascending, arch, descending left of the spine);
* bone (+400..+1000 HU, cortex brighter than marrow): vertebral bodies with discs at a
  regular z period, the posterior arch with spinous and transverse processes, ribs as
  oblique bands of the body wall (so an axial slice cuts several short rib segments),
  the sternum and, near the top, the clavicles;
* 1-4 nodules (spheres of +0..+100 HU, radius a few voxels) inside the lungs, with a mask;
* Gaussian noise (sigma 10-30 HU, per patient).

Per patient (from the seed): body size, position, ellipticity and a slight in-plane rotation,
fat thickness, lung size and apex height, diaphragm height, heart size and position, rib
period and phase, vessel branching, nodule count/position/size/density and noise level.
Geometry is defined in normalised coordinates (the field of view spans [-1, 1] along every
axis), so any array shape works and the anatomy scales with it; at the default shape and
spacing the field of view is a 320 mm cube. Everything is vectorised numpy; one 128x128x64
phantom takes well under a second.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from transvw_jax.fileio import atomic_write, atomic_write_json, atomic_write_text

_log = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1024, 3071

AIR, FAT, MUSCLE, SOFT, LIVER = -1000.0, -100.0, 45.0, 40.0, 60.0
MEDIASTINAL_FAT = -85.0
LUNG = -820.0


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One synthetic patient.

    Attributes:
      hu: int16 (X, Y, Z), Hounsfield units within [-1024, 3071], like a stored CT.
      nodules: uint8 (X, Y, Z), 1 inside nodules: ground truth for tests and demos.
      spacing: mm per voxel along X, Y, Z.
    """

    hu: np.ndarray
    nodules: np.ndarray
    spacing: tuple[float, float, float]


# --------------------------------------------------------------------------- helpers


class _Grid:
    """Normalised coordinates of a volume and the body frame of one patient.

    Image frame: u, v, s in [-1, 1] along X, Y, Z; isotropic for distances (a unit is half
    the field of view on every axis). w = (s + 1) / 2 in [0, 1] is the height, inferior to
    superior. Body frame: (bx, by) with the body outline near radius 1, so anatomy placed in
    it follows each patient's body size, position and rotation.
    """

    def __init__(self, shape: tuple[int, int, int], centre: tuple[float, float], axes: tuple[float, float],
                 angle: float):
        self.shape = shape
        self.half = np.array(shape, dtype=np.float64) / 2.0
        self.mid = (np.array(shape, dtype=np.float64) - 1.0) / 2.0
        self.axes1d = [((np.arange(n) - m) / h).astype(np.float32)
                       for n, m, h in zip(shape, self.mid, self.half, strict=True)]
        self.u, self.v, self.s = self.axes1d
        self.w = (self.s + 1.0) / 2.0
        self.centre = np.asarray(centre, dtype=np.float64)
        self.body_axes = np.asarray(axes, dtype=np.float64)
        self.cos, self.sin = np.cos(angle), np.sin(angle)
        du = self.u[:, None] - np.float32(centre[0])
        dv = self.v[None, :] - np.float32(centre[1])
        self.bx = ((self.cos * du + self.sin * dv) / axes[0]).astype(np.float32)
        self.by = ((-self.sin * du + self.cos * dv) / axes[1]).astype(np.float32)

    def to_image(self, bx: float, by: float, w: float) -> np.ndarray:
        """Body-frame point (bx, by) at height w -> image-frame (u, v, s)."""
        p0, p1 = bx * self.body_axes[0], by * self.body_axes[1]
        u = self.cos * p0 - self.sin * p1 + self.centre[0]
        v = self.sin * p0 + self.cos * p1 + self.centre[1]
        return np.array([u, v, 2.0 * w - 1.0])

    def direction(self, dx: float, dy: float) -> np.ndarray:
        """An in-plane body direction (unrotated) -> unit image-frame direction."""
        d = np.array([self.cos * dx - self.sin * dy, self.sin * dx + self.cos * dy])
        return d / np.linalg.norm(d)


def _window(grid: _Grid, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Voxel slices covering the image-frame box [lo, hi]; None when it misses the volume."""
    sl = []
    for a in range(3):
        i0 = max(int(np.floor(lo[a] * grid.half[a] + grid.mid[a])), 0)
        i1 = min(int(np.ceil(hi[a] * grid.half[a] + grid.mid[a])) + 1, grid.shape[a])
        if i0 >= i1:
            return None
        sl.append(slice(i0, i1))
    return tuple(sl)


def _segment_distance(grid: _Grid, a: np.ndarray, b: np.ndarray, reach: float):
    """Distance (image frame) of the voxels near segment a-b; (window, distances) or None.

    Only a box around the segment is evaluated, so many thin vessels stay cheap.
    """
    win = _window(grid, np.minimum(a, b) - reach, np.maximum(a, b) + reach)
    if win is None:
        return None
    u, v, s = (ax[sl] for ax, sl in zip(grid.axes1d, win, strict=True))
    d = (b - a).astype(np.float32)
    pu, pv, ps = u[:, None, None] - a[0], v[None, :, None] - a[1], s[None, None, :] - a[2]
    t = np.clip((pu * d[0] + pv * d[1] + ps * d[2]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    dist = np.sqrt((pu - t * d[0]) ** 2 + (pv - t * d[1]) ** 2 + (ps - t * d[2]) ** 2)
    return win, dist


def _paint_tube(hu: np.ndarray, grid: _Grid, a: np.ndarray, b: np.ndarray, radius: float, value: float,
                where: np.ndarray | None = None) -> None:
    """Blend a capsule of `value` into `hu`, with a one-voxel soft edge (partial volume).

    `where` (bool, like hu) restricts the painting, e.g. vessels only inside the lungs.
    """
    edge = 1.0 / grid.half[0]
    hit = _segment_distance(grid, a, b, radius + edge)
    if hit is None:
        return
    win, dist = hit
    alpha = np.clip((radius - dist) / edge + 0.5, 0.0, 1.0)
    if where is not None:
        alpha = alpha * where[win]
    hu[win] += alpha * (value - hu[win])


def _capsule_2d(grid: _Grid, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """In-plane (u, v) distance of every column to segment a-b: structures constant along z."""
    d = b - a
    pu, pv = grid.u[:, None] - a[0], grid.v[None, :] - a[1]
    t = np.clip((pu * d[0] + pv * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.sqrt((pu - t * d[0]) ** 2 + (pv - t * d[1]) ** 2)


def _bone(frac: np.ndarray) -> np.ndarray:
    """HU of bone at relative depth frac (0 centre, 1 surface): marrow ~+400, cortex ~+950."""
    return 400.0 + 550.0 * np.clip((frac - 0.55) / 0.35, 0.0, 1.0)


def _periodic_distance(x: np.ndarray, period: float) -> np.ndarray:
    """Distance of x to the nearest multiple of period."""
    f = np.mod(x / period, 1.0)
    return np.minimum(f, 1.0 - f) * period


def _vessel_tree(hu: np.ndarray, g: _Grid, hilum: np.ndarray, side: int, lungs: np.ndarray,
                 rng: np.random.Generator, depth: int = 4) -> None:
    """Pulmonary vessels of one lung: eight trunks from the hilum, each splitting in two
    `depth` times with thinner, shorter, randomly bent children; painted inside the lungs only.

    Besides realism, the trees give the lungs position-dependent texture (thick trunks near
    the hilum, fine branches in the periphery) for self-discovery to pick up.
    """
    trunks = [(0.3, 0.0, 1.0), (0.8, -0.4, 0.8), (1.0, 0.4, 0.6), (1.0, 0.3, 0.0), (1.0, -0.5, 0.1),
              (0.8, 0.5, -0.6), (0.8, -0.6, -0.6), (0.4, 0.0, -1.0)]
    stack = []
    for dx, dy, dz in trunks:
        d_in = g.direction(side * dx, dy) * np.hypot(dx, dy)
        d = np.array([d_in[0], d_in[1], dz]) + rng.normal(0.0, 0.12, 3)
        stack.append((hilum, d / np.linalg.norm(d), rng.uniform(0.2, 0.26), 0.02, 0))
    while stack:
        a, d, length, radius, level = stack.pop()
        b = a + d * length
        _paint_tube(hu, g, a, b, radius, 40.0, where=lungs)
        if level < depth:
            for _ in range(2):
                nd = d + rng.normal(0.0, 0.45, 3)
                stack.append((b, nd / np.linalg.norm(nd), length * rng.uniform(0.7, 0.85), radius * 0.75,
                              level + 1))


# --------------------------------------------------------------------------- the phantom


def _rng(seed: int, index: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"phantom index and seed must be >= 0, got index={index}, seed={seed}")
    return np.random.default_rng([seed, index])


def make_phantom(index: int, *, shape: Sequence[int] = (128, 128, 64), seed: int = 0,
                 spacing: Sequence[float] = (2.5, 2.5, 5.0)) -> Phantom:
    """Synthetic chest CT number `index` of the collection `seed`.

    Deterministic: the same (index, seed, shape) always gives the same arrays, so demo runs
    and tests are reproducible; patients of one collection share the anatomy and differ in
    its parameters, which is what self-discovery needs to find recurring patterns.

    Args:
      index: patient number (>= 0).
      shape: (X, Y, Z) voxels; the anatomy scales with it (at least 8 per axis).
      seed: collection seed (>= 0).
      spacing: mm per voxel, only recorded (the geometry is defined relative to the shape).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8, got {shape}")
    spacing = tuple(float(x) for x in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    rng = _rng(seed, index)
    U = rng.uniform

    # ---- patient parameters (all drawn up front, in a fixed order)
    body_a, body_b = U(0.78, 0.92), U(0.54, 0.68)
    centre = (U(-0.04, 0.04), U(-0.06, 0.04))
    angle = np.deg2rad(U(-4.0, 4.0))
    fat = U(0.05, 0.13)                        # fat rim, fraction of the body radius
    cavity = U(0.74, 0.79)                     # inner radius of the rib cage (body frame)
    lung_scale = U(0.88, 1.06)
    apex = U(0.90, 0.97)                       # height of the lung apices
    taper_from = U(0.50, 0.60)
    dome_base, dome_rise = U(0.02, 0.06), U(0.14, 0.22)
    heart_c = (U(-0.16, -0.06), U(0.12, 0.24), U(0.24, 0.32))
    heart_r = (U(0.32, 0.40), U(0.26, 0.34), U(0.15, 0.19))
    rib_period, rib_phase, rib_slope = U(0.085, 0.11), U(0.0, 1.0), U(0.40, 0.55)
    carina = U(0.55, 0.62)
    sigma = U(10.0, 30.0)

    g = _Grid(shape, centre, (body_a, body_b), angle)
    X, Y, _ = shape
    bx, by = g.bx[:, :, None], g.by[:, :, None]
    w = g.w[None, None, :]
    size = float(np.sqrt(body_a * body_b) / 0.7)   # overall body scale, ~1

    # ---- body, fat rim, rib cage cavity
    r_body = (np.abs(g.bx) ** 2.4 + np.abs(g.by) ** 2.4) ** (1 / 2.4)   # boxy ellipse, 2-D
    hu = np.full(shape, AIR, dtype=np.float32)
    r3 = r_body[:, :, None]
    hu[np.broadcast_to(r3 < 1.0, shape)] = FAT
    hu[np.broadcast_to(r3 < 1.0 - fat, shape)] = MUSCLE
    in_cavity = r3 < cavity

    # ---- lungs: ellipses per side, tapered to the apex, domed by the diaphragm
    taper = np.sqrt(np.clip((apex - g.w) / (apex - taper_from), 0.0, 1.0))[None, None, :]
    lungs = np.zeros(shape, dtype=bool)
    dome = np.zeros((X, Y, 1), dtype=np.float32)
    for side, cx, ax, ay, lift in ((1, 0.42, 0.37, 0.62, 0.03), (-1, -0.42, 0.34, 0.60, 0.0)):
        ax, ay = ax * lung_scale, ay * lung_scale
        e2 = ((g.bx - cx) / ax) ** 2 + ((g.by + 0.05) / ay) ** 2                       # 2-D
        d_side = dome_base + lift + dome_rise * (1.0 - np.clip(e2, 0.0, 1.0))
        dome = np.where((side * g.bx > 0)[:, :, None], d_side[:, :, None], dome)
        tt = np.maximum(taper, 1e-3)
        e3 = ((bx - cx) / (ax * tt)) ** 2 + ((by + 0.05) / (ay * tt)) ** 2
        lungs |= (e3 < 1.0) & (w > d_side[:, :, None]) & (taper > 0)
    lungs &= (r3 < cavity - 0.02) & (np.abs(bx) > 0.15)

    hk = (((bx - heart_c[0]) / heart_r[0]) ** 2 + ((by - heart_c[1]) / heart_r[1]) ** 2
          + ((w - heart_c[2]) / heart_r[2]) ** 2)
    vb_centre = g.to_image(0.0, -0.5, 0.0)[:2]
    vb_radius = 0.10 * size
    d_spine = np.sqrt((g.u[:, None] - vb_centre[0]) ** 2 + (g.v[None, :] - vb_centre[1]) ** 2)   # 2-D
    lungs &= (hk > 1.2) & (d_spine[:, :, None] > vb_radius + 0.04)

    # ---- cavity contents: abdomen below the diaphragm, mediastinal fat, muscle elsewhere
    abdomen = in_cavity & (w < dome)
    hu[in_cavity & ~abdomen] = MEDIASTINAL_FAT
    hu[in_cavity & ~abdomen & (np.abs(bx) > 0.32)] = MUSCLE
    hu[abdomen] = SOFT
    hu[abdomen & (bx > -0.25)] = LIVER
    bubble = ((bx + 0.4) / 0.16) ** 2 + ((by - 0.15) / 0.2) ** 2 + ((w - 0.06) / 0.06) ** 2
    hu[abdomen & (bubble < 1.0) & (w > 0.03)] = AIR

    # ---- heart with epicardial fat, aorta
    hu[in_cavity & (hk < 1.12) & (w > dome_base)] = MEDIASTINAL_FAT
    hu[in_cavity & (hk < 1.0) & (w > dome_base)] = SOFT
    aorta_r = 0.055 * size
    arch = [(0.05, 0.2, heart_c[2] + 0.1), (0.05, 0.2, carina + 0.1), (-0.06, 0.05, carina + 0.16),
            (-0.16, -0.2, carina + 0.15), (-0.17, -0.42, carina + 0.1), (-0.17, -0.42, -0.05)]
    outside_lungs = ~lungs
    for p, q in zip(arch[:-1], arch[1:], strict=True):
        _paint_tube(hu, g, g.to_image(*p), g.to_image(*q), aorta_r, 45.0, where=outside_lungs)

    # ---- lung parenchyma (denser posteriorly) and vessel trees from each hilum
    hu[lungs] = np.broadcast_to(LUNG - 35.0 * by, shape)[lungs]
    for side in (1, -1):
        _vessel_tree(hu, g, g.to_image(side * 0.30, -0.02, carina - 0.14), side, lungs, rng)

    # ---- airway: trachea, carina, main and lobar bronchi (soft-tissue wall, air lumen)
    tr = 0.05 * size
    top = g.to_image(0.0, -0.02, 1.1)
    car = g.to_image(0.0, -0.02, carina)
    tree = [(top, car, tr)]
    for side, drop, reach in ((1, 0.08, 0.28), (-1, 0.13, 0.30)):
        main_end = g.to_image(side * reach, -0.06, carina - drop)
        tree.append((car, main_end, 0.7 * tr))
        tree.append((main_end, g.to_image(side * 0.45, 0.05, carina - drop + 0.12), 0.45 * tr))
        tree.append((main_end, g.to_image(side * 0.47, -0.2, carina - drop - 0.14), 0.45 * tr))
    for a, b, r in tree:
        _paint_tube(hu, g, a, b, 1.35 * r, 30.0)
    for a, b, r in tree:
        _paint_tube(hu, g, a, b, r, AIR)

    # ---- spine: vertebral bodies with discs, canal, posterior arch and processes
    vb_frac = (d_spine / vb_radius)[:, :, None]
    disc = _periodic_distance(w - rib_phase * rib_period + rib_period / 2, rib_period) < 0.12 * rib_period
    vb_mask = np.broadcast_to(vb_frac < 1.0, shape)
    hu[vb_mask] = np.where(disc, 90.0, _bone(vb_frac))[vb_mask]
    post = g.direction(0.0, -1.0)
    canal_r = 0.04 * size
    canal = vb_centre + post * (vb_radius + canal_r * 1.1)
    d_canal = np.sqrt((g.u[:, None] - canal[0]) ** 2 + (g.v[None, :] - canal[1]) ** 2)
    arch_w = 0.022 * size
    # the arch all along z; spinous and transverse processes only at mid-vertebra level
    arch_2d = (d_canal > canal_r) & (d_canal < canal_r + arch_w)
    procs = np.zeros((X, Y), dtype=bool)
    for dx, dy, length in ((0.0, -1.0, 0.11), (1.0, -0.35, 0.13), (-1.0, -0.35, 0.13)):
        start = canal + g.direction(dx, dy) * canal_r
        procs |= _capsule_2d(g, start, start + g.direction(dx, dy) * length * size) < 0.6 * arch_w
    mid_vertebra = _periodic_distance(w - rib_phase * rib_period, rib_period) < 0.3 * rib_period
    posterior = arch_2d[:, :, None] | (procs[:, :, None] & mid_vertebra)
    hu[posterior] = 750.0
    hu[np.broadcast_to((d_canal <= canal_r)[:, :, None], shape)] = 20.0

    # ---- ribs: oblique bands of the body wall, descending anteriorly
    rib_r, rib_t = cavity + 0.045, 0.03
    # angle around the body from the spine: 0 at the back, 1 at the front
    from_back = (np.arccos(np.clip(-g.by / np.maximum(r_body, 1e-6), -1.0, 1.0)) / np.pi)[:, :, None]
    rib_z = _periodic_distance(w - rib_phase * rib_period + rib_slope * from_back, rib_period)
    rib_s = np.sqrt(((r3 - rib_r) / rib_t) ** 2 + (rib_z / (0.018 * size)) ** 2)
    ribs = (rib_s < 1.0) & (from_back > 0.06) & (from_back < 0.84) & (w > 0.06) & (w < apex)
    hu[ribs] = _bone(rib_s)[ribs]

    # ---- sternum and clavicles
    sternum = ((np.abs(bx) < 0.13) & (np.abs(by - (cavity + 0.05)) < 0.045) & (w > heart_c[2] - 0.05)
               & (w < apex - 0.03))
    hu[sternum] = 600.0
    for side in (1, -1):
        _paint_tube(hu, g, g.to_image(side * 0.12, cavity + 0.06, apex - 0.02),
                    g.to_image(side * 0.85, 0.45, apex + 0.03), 0.028 * size, 750.0)

    # ---- nodules: spheres inside the lungs
    nodules = np.zeros(shape, dtype=np.uint8)
    count = int(rng.integers(1, 5))
    for _ in range(count):
        radius = max(U(0.025, 0.06), 1.2 / g.half[0])
        centre_vox = _nodule_centre(lungs, radius, g, rng)
        if centre_vox is None:
            continue
        c = np.array([g.axes1d[a][centre_vox[a]] for a in range(3)])
        win, dist = _segment_distance(g, c, c, radius)        # a point segment: a sphere
        inside = dist < radius                                 # holds the centre voxel (dist 0)
        nodules[win][inside] = 1
        hu[win][inside] = U(0.0, 100.0)

    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    out = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return Phantom(hu=out, nodules=nodules, spacing=spacing)


def _nodule_centre(lungs: np.ndarray, radius: float, g: _Grid,
                   rng: np.random.Generator) -> tuple[int, int, int] | None:
    """A random lung voxel with lung `radius` away along each axis (so the sphere stays in the
    lung), falling back to any lung voxel; None only when there is no lung at all."""
    deep = lungs.copy()
    for a in range(3):
        n, k = lungs.shape[a], max(int(np.ceil(radius * g.half[a])), 1)
        if k >= n:
            deep[:] = False
            break
        head, tail = [slice(None)] * 3, [slice(None)] * 3
        head[a], tail[a] = slice(0, n - k), slice(k, n)
        head, tail = tuple(head), tuple(tail)
        shifted = np.zeros_like(lungs)
        shifted[tail] = lungs[head]                 # shifted[i] = lungs[i - k]
        deep &= shifted
        shifted[:] = False
        shifted[head] = lungs[tail]                 # shifted[i] = lungs[i + k]
        deep &= shifted
    candidates = np.flatnonzero(deep)
    if candidates.size == 0:
        candidates = np.flatnonzero(lungs)
    if candidates.size == 0:
        return None
    return tuple(int(i) for i in np.unravel_index(candidates[rng.integers(candidates.size)], lungs.shape))


# --------------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name in the same directory, then rename over `path`.

    A reader (or an interrupted run) never sees a half-written volume; the temporary name
    starts with a dot so directory scans skip it.
    """
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _nifti_gz(array: np.ndarray, spacing: tuple[float, float, float]) -> bytes:
    """A .nii.gz file's bytes; gzip with mtime 0 so the same phantom gives identical files."""
    affine = np.diag([*spacing, 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def write_phantoms(directory: str | os.PathLike, count: int, *, shape: Sequence[int] = (128, 128, 64),
                   seed: int = 0, spacing: Sequence[float] = (2.5, 2.5, 5.0),
                   masks: bool = False) -> list[Path]:
    """Write phantoms 0..count-1 as {directory}/phantom_{i:04d}.nii.gz (int16 HU).

    The affine is diag(spacing, 1): RAS+ with positive axes, so a canonical reader returns
    exactly `make_phantom(i).hu`. With masks=True the nodule masks go to
    {directory}/masks/phantom_{i:04d}.nii.gz (uint8), outside the volume directory so a scan
    of it does not take masks for patients. Files are written atomically and are
    byte-identical between runs.

    Returns:
      the volume paths, in index order.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if masks:
        (directory / "masks").mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        ph = make_phantom(i, shape=shape, seed=seed, spacing=spacing)
        name = f"phantom_{i:04d}.nii.gz"
        path = directory / name
        _write_atomic(path, _nifti_gz(ph.hu, ph.spacing))
        _log.debug("wrote %s", path)
        if masks:
            mask_path = directory / "masks" / name
            _write_atomic(mask_path, _nifti_gz(ph.nodules, ph.spacing))
            _log.debug("wrote %s", mask_path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- labeled dataset

# Negatives are drawn from lung parenchyma, found from the HU values because make_phantom does
# not return its lung mask: a 3x3x3 mean first (so per-voxel noise does not punch holes in the
# mask), then one erosion (so the one-voxel rings that the mean makes at air/tissue steps,
# e.g. around the airway lumen or the skin, are dropped).
_NEGATIVE_HU = (-900.0, -600.0)
_NEGATIVE_MARGIN = 3          # negatives lie more than this many voxels (chessboard) from a nodule


def _nodule_centres(nodules: np.ndarray) -> list[tuple[int, int, int]]:
    """One voxel per connected nodule: its rounded centre of mass, snapped to the nearest voxel
    of the nodule when rounding (or a non-convex union of overlapping spheres) leaves it.

    26-connectivity, so a small sphere digitised into diagonal-only contacts stays one nodule.
    """
    labels, n = ndimage.label(nodules > 0, structure=np.ones((3, 3, 3), dtype=bool))
    centres = []
    for k in range(1, n + 1):
        com = np.array(ndimage.center_of_mass(labels == k))
        c = np.clip(np.rint(com).astype(np.int64), 0, np.array(nodules.shape) - 1)
        if labels[tuple(c)] != k:
            voxels = np.argwhere(labels == k)
            c = voxels[np.argmin(((voxels - com) ** 2).sum(axis=1))]
        centres.append(tuple(int(x) for x in c))
    return centres


def _negative_centres(ph: Phantom, count: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """`count` distinct voxels of lung parenchyma at least _NEGATIVE_MARGIN voxels from any nodule.

    The region narrows step by step only as far as the volume allows (the large pieces of
    eroded lung -> lung -> anything clear of nodules), so tiny test shapes still get
    negatives; a negative is never inside a nodule.
    """
    if count <= 0:
        return []
    if ph.nodules.any():
        clear = ~ndimage.binary_dilation(ph.nodules > 0, structure=np.ones((3, 3, 3), dtype=bool),
                                         iterations=_NEGATIVE_MARGIN)
    else:
        clear = np.ones(ph.nodules.shape, dtype=bool)
    mean = ndimage.uniform_filter(ph.hu.astype(np.float32), size=3, mode="nearest")
    lung = (mean > _NEGATIVE_HU[0]) & (mean < _NEGATIVE_HU[1])
    parenchyma = ndimage.binary_erosion(lung)
    # the two lungs are by far the largest pieces; stray voxels at other air edges are dropped
    pieces, n = ndimage.label(parenchyma)
    if n > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        parenchyma = sizes[pieces] >= 0.1 * sizes.max()
    region = np.zeros_like(clear)
    for candidate in (parenchyma & clear, lung & clear, clear, ph.nodules == 0):
        if candidate.any():
            region = candidate
            break
    flat = np.flatnonzero(region)
    if flat.size == 0:
        return []
    picks = rng.choice(flat.size, size=min(count, flat.size), replace=False)
    return [tuple(int(x) for x in np.unravel_index(flat[j], region.shape)) for j in picks]


def write_labeled_dataset(directory: str | os.PathLike, count: int, *, shape: Sequence[int] = (128, 128, 64),
                          seed: int = 0, spacing: Sequence[float] = (2.5, 2.5, 5.0),
                          negatives_per_case: int = 2) -> Path:
    """Write phantoms 0..count-1 as an nnU-Net v2 raw dataset plus a candidate CSV.

    Fine-tuning demos and tests need labeled data with known ground truth and no download:
    this gives both downstream tasks the embedded phantoms support, nodule segmentation
    (`imagesTr/`, `labelsTr/`, `dataset.json`, read by `labeled.read_nnunet`) and nodule
    false-positive reduction (`candidates.csv`, read by `labeled.read_candidates`).

    Layout:
      imagesTr/phantom_{i:04d}_0000.nii.gz: int16 HU, the same bytes `write_phantoms` writes.
      labelsTr/phantom_{i:04d}.nii.gz: uint8, 1 inside nodules, same affine diag(spacing, 1).
      dataset.json: channel "CT", labels background 0 / nodule 1.
      candidates.csv: `volume,x,y,z,label`, volume relative to `directory`, x, y, z voxel
        indices of the canonical array (= `make_phantom(i).hu`, since the affine is RAS+).
        Label 1: the centre of every connected nodule (a phantom may have none). Label 0:
        `negatives_per_case` lung voxels at least a few voxels from any nodule, drawn with a
        generator seeded by (seed, index), so they are reproducible.

    Every file is written atomically and the same arguments give byte-identical files.
    Files of a previous, larger dataset in `directory` are not removed.

    Returns:
      `directory`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if negatives_per_case < 0:
        raise ValueError(f"negatives_per_case must be >= 0, got {negatives_per_case}")
    directory = Path(directory)
    (directory / "imagesTr").mkdir(parents=True, exist_ok=True)
    (directory / "labelsTr").mkdir(exist_ok=True)
    rows: list[tuple[str, int, int, int, int]] = []
    for i in range(count):
        ph = make_phantom(i, shape=shape, seed=seed, spacing=spacing)
        image = f"imagesTr/phantom_{i:04d}_0000.nii.gz"
        _write_atomic(directory / image, _nifti_gz(ph.hu, ph.spacing))
        _write_atomic(directory / "labelsTr" / f"phantom_{i:04d}.nii.gz", _nifti_gz(ph.nodules, ph.spacing))
        _log.debug("wrote case %s", image)
        rows.extend((image, *c, 1) for c in _nodule_centres(ph.nodules))
        # a stream of its own (third key), so it does not repeat make_phantom's draws
        rng = np.random.default_rng([seed, i, 1])
        rows.extend((image, *c, 0) for c in _negative_centres(ph, negatives_per_case, rng))
    atomic_write_json(directory / "dataset.json", {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "nodule": 1},
        "numTraining": count,
        "file_ending": ".nii.gz",
        "name": "phantom_nodules",
        "description": "Synthetic chest-CT phantoms (transvw_jax.data.synthetic) with nodule masks; "
                       "toy data for fine-tuning demos and tests, not for any clinical claim.",
    }, indent=2)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["volume", "x", "y", "z", "label"])
    writer.writerows(rows)
    atomic_write_text(directory / "candidates.csv", buf.getvalue())
    return directory
