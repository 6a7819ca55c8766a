"""Sliding-window inference and the downstream metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transvw_jax import evaluation, inference
from transvw_jax.models import UNet3D, init_variables


@pytest.mark.parametrize("shape", [(37, 29, 11), (16, 16, 8), (10, 20, 5)])
@pytest.mark.parametrize("blending,overlap", [("gaussian", 0.5), ("constant", 0.25), ("gaussian", 0.0)])
def test_identity_network_reconstructs_any_volume(shape, blending, overlap):
    volume = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = inference.sliding_window(lambda x: x, volume, (16, 16, 8), overlap=overlap, batch_size=3,
                                   blending=blending)
    assert out.shape == shape + (1,)
    np.testing.assert_allclose(out[..., 0], volume, rtol=1e-5, atol=1e-6)


def test_windows_cover_the_axis_and_end_at_the_border():
    assert inference.window_starts(37, 16, 0.5) == [0, 7, 14, 21]
    assert inference.window_starts(16, 16, 0.5) == [0]
    assert inference.window_starts(100, 16, 0.0)[-1] == 84


def test_a_unet_predicts_a_whole_volume():
    model = UNet3D(width=2, out_channels=3)
    variables = init_variables(model, jax.random.key(0))
    predict = lambda x: model.apply(variables, x[..., None], train=False)  # noqa: E731
    out = inference.sliding_window(predict, np.zeros((20, 18, 9), np.float32), (16, 16, 8))
    assert out.shape == (20, 18, 9, 3) and np.isfinite(out).all()
    assert jnp.all((out >= 0) & (out <= 1))


def test_dice_and_iou_by_hand():
    target = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 0])
    m = evaluation.dice_iou(pred, target, num_classes=4)
    # class 0: pred {0,4,5}, target {0,1}: inter 1 -> dice 2/5, iou 1/4
    # class 1: pred {1,2,3}, target {2,3,4}: inter 2 -> dice 4/6, iou 2/4
    # class 2: pred {}, target {5}: 0; class 3: absent from both: 1
    np.testing.assert_allclose(m["dice"], [0.4, 2 / 3, 0.0, 1.0])
    np.testing.assert_allclose(m["iou"], [0.25, 0.5, 0.0, 1.0])
    empty = evaluation.dice_iou(np.zeros(5), np.zeros(5), num_classes=2)
    np.testing.assert_allclose(empty["dice"], [1.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        evaluation.dice_iou(np.zeros(5), np.zeros(6), 2)


def test_auc_by_hand_with_ties():
    assert evaluation.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert evaluation.roc_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert evaluation.roc_auc([0.2, 0.5, 0.5, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    assert np.isnan(evaluation.roc_auc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="binary"):
        evaluation.roc_auc([0.1, 0.2], [0, 2])
    assert evaluation.mean_sd([1.0, 3.0, float("nan")]) == pytest.approx((2.0, np.sqrt(2.0)))
