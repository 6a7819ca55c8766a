"""PNG sample grids: one labelled row per cube, written atomically, readable."""

import jax
import numpy as np
import pytest
from PIL import Image

from transvw_jax import samples
from transvw_jax import transforms as T


@pytest.mark.slow
def test_transform_grid_has_a_row_per_transform_and_the_policy(tmp_path):
    cube = samples.phantom_cube((16, 16, 8), seed=1)
    assert cube.shape == (16, 16, 8) and cube.min() >= 0 and cube.max() <= 1
    rows = samples.transform_rows(jax.random.key(0), cube, T.default_config("genesis"))
    assert [name for name, _ in rows[:6]] == ["original", "local shuffle", "non-linear", "in-paint",
                                              "out-paint", "elastic"]
    assert rows[-1][0].startswith("genesis:") and len(rows) == 7
    assert all(np.asarray(c).shape == cube.shape for _, c in rows)
    path = samples.save_png(samples.render_grid(rows, scale=2), tmp_path / "grid.png")
    image = Image.open(path)
    assert image.mode == "L"
    assert image.size == (samples.LABEL_WIDTH + 4 * (16 * 2 + 4), 7 * (16 * 2 + 4))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_grid_pixels_are_the_slices():
    cube = np.zeros((8, 8, 4), np.float32)
    cube[:, :, 2] = 1.0
    image = np.asarray(samples.render_grid([("x", cube)], slices=[1, 2], scale=1))
    left = samples.LABEL_WIDTH
    assert image[:8, left:left + 8].max() == 0  # slice 1: black
    assert image[:8, left + 12:left + 20].min() == 255  # slice 2: white
