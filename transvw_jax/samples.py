"""PNG grids of cubes: what each restoration transform and each policy does to a cube.

Rows are labelled images (original, each transform, the policy output); columns are a few
axial (z) slices. Used for the README figure and, later, the periodic samples of a run.

  python -m transvw_jax.samples --out docs/transforms.png       # on a procedural cube
  python -m transvw_jax.samples --out t.png --policy genesis --seed 3
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from transvw_jax import transforms as T
from transvw_jax.fileio import atomic_write

LABEL_WIDTH = 110


def render_grid(rows: Sequence[tuple[str, np.ndarray]], slices: Sequence[int] | None = None,
                scale: int = 2) -> Image.Image:
    """One labelled row per (name, cube (X, Y, Z) in [0, 1]); columns are z slices.

    Args:
      rows: (label, cube) pairs, all cubes of one shape.
      slices: z indices to show (default: 4 evenly spaced).
      scale: integer upscaling of each slice (nearest neighbour).
    """
    shape = np.asarray(rows[0][1]).shape
    if slices is None:
        slices = np.linspace(0, shape[2] - 1, 6).round().astype(int)[1:-1]
    w, h = shape[1] * scale, shape[0] * scale
    pad = 4
    grid = Image.new("L", (LABEL_WIDTH + len(slices) * (w + pad), len(rows) * (h + pad)), 0)
    draw = ImageDraw.Draw(grid)
    for r, (label, cube) in enumerate(rows):
        cube = np.clip(np.asarray(cube, np.float32), 0, 1)
        draw.multiline_text((4, r * (h + pad) + h // 2 - 6 * (1 + label.count("\n"))), label, fill=255)
        for c, z in enumerate(slices):
            tile = Image.fromarray((cube[:, :, z] * 255).round().astype(np.uint8))
            tile = tile.resize((w, h), Image.NEAREST)
            grid.paste(tile, (LABEL_WIDTH + c * (w + pad), r * (h + pad)))
    return grid


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write atomically: a temporary file beside `path`, then a rename."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def transform_rows(key: jax.Array, cube: np.ndarray, cfg) -> list[tuple[str, np.ndarray]]:
    """The original, each single transform with the policy's settings, and the policy."""
    x = jnp.asarray(cube, jnp.float32)
    k = jax.random.split(key, 7)
    singles = [
        ("local shuffle", functools.partial(T.local_shuffle, num_blocks=cfg.local_shuffle.num_blocks)),
        ("non-linear", T.nonlinear),
        ("in-paint", functools.partial(T.in_paint, max_blocks=cfg.in_paint.max_blocks)),
        ("out-paint", functools.partial(T.out_paint, max_extra_blocks=cfg.out_paint.max_extra_blocks)),
        ("elastic", functools.partial(T.elastic, alpha=cfg.elastic.alpha, sigma=cfg.elastic.sigma)),
    ]
    rows = [("original", cube)]
    rows += [(name, np.asarray(jax.jit(fn)(kk, x))) for (name, fn), kk in zip(singles, k, strict=False)]
    inp, _, tid = jax.jit(lambda k, x: T.apply_policy(k, x, cfg))(k[6], x)
    rows.append((f"{cfg.policy}:\n{_describe(cfg.policy, int(tid))}", np.asarray(inp)))
    return rows


def _describe(policy: str, tid: int) -> str:
    if policy == "transvw":
        return T.TRANSFORM_NAMES[tid].replace("_", " ")
    names = [n.replace("local_", "").replace("_", "-")
             for i, n in enumerate(T.TRANSFORM_NAMES) if tid >> i & 1]
    return "\n".join(names) or "none"


def phantom_cube(shape: tuple[int, int, int] = (64, 64, 32), seed: int = 0) -> np.ndarray:
    """A procedural CT-like cube in [0, 1]: soft tissue, two dark lung lobes with bright
    vessels, a bright bone edge and noise. For figures and smoke tests, not for training."""
    rng = np.random.default_rng(seed)
    gx, gy, gz = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    cube = np.full(shape, 0.52)
    for cx in (-0.45, 0.45):
        lung = ((gx - cx) / 0.38) ** 2 + (gy / 0.7) ** 2 + (gz / 1.2) ** 2 < 1
        cube[lung] = 0.12
    for _ in range(14):  # vessels: thin bright tubes along z
        vx, vy, r = rng.uniform(-0.8, 0.8), rng.uniform(-0.6, 0.6), rng.uniform(0.03, 0.07)
        cube[(gx - vx) ** 2 + (gy - vy) ** 2 < r**2] = rng.uniform(0.5, 0.6)
    cube[np.abs(gy + 0.92) < 0.05] = 0.85  # a bone edge
    cube += rng.normal(0, 0.02, shape)
    return np.clip(cube, 0, 1).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--policy", default="transvw", choices=sorted(T.POLICIES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cfg = T.default_config(args.policy)
    rows = transform_rows(jax.random.key(args.seed), phantom_cube(seed=args.seed), cfg)
    print(save_png(render_grid(rows), args.out))


if __name__ == "__main__":
    main()
