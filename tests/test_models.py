"""The Flax U-Net family: reference parameter counts, layouts, BatchNorm modes, dtypes."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env, jit_apply, random_cubes
from flax.traverse_util import flatten_dict

from transvw_jax.models import (
    EncoderClassifier,
    UNet3D,
    YNet3D,
    abstract_variables,
    build_model,
    init_variables,
)
from transvw_jax.models.layers import BatchNorm, ConvTranspose2x, max_pool_2x


def n_params(model) -> int:
    shapes = abstract_variables(model)
    return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize(
    "model, expected",
    [
        (UNet3D(), 19_073_665),
        (YNet3D(num_classes=44), 33_277_613),
        (YNet3D(num_classes=200), 33_437_513),
        (EncoderClassifier(num_classes=44), 21_231_724),
    ],
    ids=["unet3d", "ynet3d-44", "ynet3d-200", "encoder-44"],
)
def test_parameter_counts_match_the_reference(model, expected):
    assert n_params(model) == expected


@pytest.mark.slow
def test_output_shapes_and_ranges():
    model = YNet3D(num_classes=6, width=4)
    variables = init_variables(model, jax.random.key(0))
    x = random_cubes((3, 16, 24, 8, 1))
    restoration, logits = jit_apply(model)(variables, x, train=False)
    assert restoration.shape == x.shape and restoration.dtype == jnp.float32
    assert logits.shape == (3, 6) and logits.dtype == jnp.float32
    assert float(restoration.min()) >= 0.0 and float(restoration.max()) <= 1.0


def test_input_must_be_divisible_by_8():
    model = UNet3D(width=4)
    variables = init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match="divisible by 8"):
        jit_apply(model)(variables, random_cubes((1, 16, 16, 12, 1)), train=False)


def test_conv_transpose_writes_one_block_per_voxel():
    """out[2x+i, 2y+j, 2z+k] = x[x, y, z] @ W[i, j, k] + b, checked against a loop."""
    layer = ConvTranspose2x(features=3)
    x = random_cubes((1, 2, 3, 2, 5))
    variables = layer.init(jax.random.key(0), x)
    w = np.asarray(variables["params"]["kernel"])
    b = np.asarray(variables["params"]["bias"])
    expected = np.zeros((1, 4, 6, 4, 3), np.float32)
    for ix, iy, iz in np.ndindex(2, 3, 2):
        for i, j, k in np.ndindex(2, 2, 2):
            expected[0, 2 * ix + i, 2 * iy + j, 2 * iz + k] = x[0, ix, iy, iz] @ w[i, j, k] + b
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


def test_max_pool_matches_flax_max_pool():
    x = jnp.asarray(random_cubes((2, 8, 4, 6, 3)))
    expected = nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    np.testing.assert_array_equal(max_pool_2x(x), expected)


def test_max_pool_gradient_goes_to_one_element_of_each_window():
    """Like PyTorch's max_pool3d: the window's maximum (the first of tied ones) gets the
    whole gradient, never a share of it and never 0/0."""
    x = np.asarray(random_cubes((1, 4, 2, 2, 1)))
    x[0, 2:, :, :, 0] = 0.5  # the second window: eight tied maxima
    weights = jnp.array([3.0, 5.0]).reshape(1, 2, 1, 1, 1)
    g = np.asarray(jax.grad(lambda v: (max_pool_2x(v) * weights).sum())(x))
    first = g[0, :2, :, :, 0]
    assert np.count_nonzero(first) == 1 and first.flat[np.argmax(x[0, :2, :, :, 0])] == 3.0
    tied = g[0, 2:, :, :, 0]
    assert tied[0, 0, 0] == 5.0 and np.count_nonzero(tied) == 1
    # Without ties, the same gradient as flax's reduce_window pooling.
    y = jnp.asarray(random_cubes((2, 8, 4, 6, 3), seed=3))
    flax_grad = jax.grad(lambda v: jnp.sum(jnp.sin(nn.max_pool(v, (2, 2, 2), strides=(2, 2, 2)))))(y)
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(jnp.sin(max_pool_2x(v))))(y), flax_grad)
    # A NaN anywhere in a window is its maximum, as with jnp.max.
    for i in range(8):
        z = np.array(random_cubes((1, 2, 2, 2, 1)))
        z.reshape(-1)[i] = np.nan
        assert np.isnan(np.asarray(max_pool_2x(jnp.asarray(z)))).all(), i


@pytest.mark.slow
def test_reference_bn_uses_batch_statistics_in_evaluation(small_ynet):
    model, variables = small_ynet
    x = random_cubes(seed=5)
    in_train, _ = jit_apply(model)(variables, x, train=True, mutable=("batch_stats",))
    in_eval = jit_apply(model)(variables, x, train=False)
    np.testing.assert_allclose(in_eval[0], in_train[0], rtol=1e-6, atol=1e-6)
    # Statistics of the batch, not running averages: a single cube's output depends on
    # what else is in the batch.
    alone, _ = jit_apply(model)(variables, x[:1], train=False)
    assert np.abs(np.asarray(alone) - np.asarray(in_eval[0][:1])).max() > 1e-4


def test_standard_bn_uses_running_statistics_in_evaluation(small_ynet):
    _, variables = small_ynet
    model = YNet3D(num_classes=6, width=4, bn="standard")
    x = random_cubes(seed=5)
    batch, _ = jit_apply(model)(variables, x, train=False)
    alone, _ = jit_apply(model)(variables, x[:1], train=False)
    np.testing.assert_allclose(alone, batch[:1], rtol=1e-5, atol=1e-6)


def test_batchnorm_running_statistics_follow_pytorch():
    """momentum 0.1 and the unbiased batch variance, as torch.nn.BatchNorm3d."""
    torch = pytest.importorskip("torch")
    x = random_cubes((2, 4, 4, 2, 3), seed=3) * 5 + 2
    bn = BatchNorm()
    variables = bn.init(jax.random.key(0), x, train=False)
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    ref = torch.nn.BatchNorm3d(3).train()
    y_ref = ref(torch.from_numpy(x.transpose(0, 4, 1, 2, 3))).detach().numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(updates["batch_stats"]["var"], ref.running_var.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(small_ynet):
    _, variables = small_ynet
    x = random_cubes(seed=2)
    reference = jit_apply(YNet3D(num_classes=6, width=4))(variables, x, train=False)
    model = YNet3D(num_classes=6, width=4, dtype=jnp.bfloat16)
    fresh = init_variables(model, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(fresh))
    restoration, logits = jit_apply(model)(variables, x, train=False)
    assert restoration.dtype == jnp.float32 and logits.dtype == jnp.float32
    np.testing.assert_allclose(restoration, reference[0], atol=3e-2)
    np.testing.assert_allclose(logits, reference[1], atol=5e-2)


def test_encoder_classifier_takes_ynet_weights(small_ynet):
    model, variables = small_ynet
    classifier = EncoderClassifier(num_classes=6, width=4)
    like = abstract_variables(classifier)
    for collection in ("params", "batch_stats"):
        ours = set(flatten_dict(like[collection]))
        assert ours and ours <= set(flatten_dict(variables[collection]))
    subset = {c: {k: variables[c][k] for k in like[c]} for c in ("params", "batch_stats")}
    x = random_cubes(seed=4)
    _, ynet_logits = jit_apply(model)(variables, x, train=False)
    logits = jit_apply(classifier)(subset, x, train=False)
    np.testing.assert_allclose(logits, ynet_logits, rtol=1e-6, atol=1e-6)


def test_training_updates_only_batch_stats_collection(small_ynet):
    model, variables = small_ynet
    _, updates = jit_apply(model)(variables, random_cubes(seed=9), train=True, mutable=("batch_stats",))
    before = flatten_dict(variables["batch_stats"])
    after = flatten_dict(updates["batch_stats"])
    assert before.keys() == after.keys()
    assert all(not np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "vnet"}, "model.name"),
        ({"width": 0}, "model.width"),
        ({"bn": "sync"}, "model.bn"),
        ({"dtype": "float16"}, "model.dtype"),
        ({"num_classes": 0}, "model.num_classes"),
        ({"conv_impl": "fft"}, "model.conv_impl"),
    ],
)
def test_build_model_names_the_bad_key(cfg, match):
    from transvw_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_model(cfg)


@pytest.mark.parametrize("impl", ["matmul", "onednn"])
@pytest.mark.parametrize("k, cin, cout", [(3, 3, 5), (1, 4, 2), (5, 2, 3), (3, 6, 2), (3, 1, 16)])
def test_fast_convolutions_match_xla_3d(impl, k, cin, cout):
    """Forward and both gradients of the CPU fast paths equal lax's 3D convolution."""
    from transvw_jax.models.layers import conv3d_same

    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((2, 6, 8, 4, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, k, cin, cout)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 6, 8, 4, cout)), jnp.float32)

    def loss(impl):
        return lambda x, w: (conv3d_same(x, w, impl) * cot).sum()

    np.testing.assert_allclose(conv3d_same(x, w, impl), conv3d_same(x, w, "xla3d"), rtol=1e-5, atol=1e-4)
    fast = jax.grad(loss(impl), argnums=(0, 1))(x, w)
    slow = jax.grad(loss("xla3d"), argnums=(0, 1))(x, w)
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_conv_impls_give_the_same_model_outputs(small_ynet):
    _, variables = small_ynet
    x = random_cubes(seed=6)
    outs = [jit_apply(YNet3D(num_classes=6, width=4, conv_impl=impl))(variables, x, train=False)
            for impl in ("xla3d", "matmul", "onednn")]
    for other in outs[1:]:
        np.testing.assert_allclose(outs[0][0], other[0], atol=1e-5)
        np.testing.assert_allclose(outs[0][1], other[1], atol=1e-4)


def test_auto_conv_impl_is_matmul_on_several_cpu_devices():
    """The tests run on 8 simulated CPU devices: a sharded batch keeps XLA's own path."""
    from transvw_jax.models.layers import default_conv_impl

    assert jax.device_count() > 1
    assert default_conv_impl("cpu") == "matmul"
    assert default_conv_impl("gpu") == "xla3d" and default_conv_impl("tpu") == "xla3d"
    assert build_model({"name": "unet3d", "width": 4}).conv_impl == default_conv_impl()
    assert build_model({"name": "unet3d", "width": 4, "conv_impl": "xla3d"}).conv_impl == "xla3d"


def test_auto_conv_impl_is_onednn_on_one_cpu_device():
    code = ("from transvw_jax.models import build_model; "
            "print(build_model({'name': 'unet3d', 'width': 4}).conv_impl)")
    env = cpu_env()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "onednn"


@pytest.mark.slow
def test_onednn_training_step_matches_matmul(small_ynet):
    """A whole YNet3D gradient (every layer's forward, input and kernel gradient through
    the custom calls) equals the matmul path's."""
    _, variables = small_ynet
    x = random_cubes(seed=9)

    def grads(impl):
        model = YNet3D(num_classes=6, width=4, conv_impl=impl)

        def loss(params):
            (restored, logits), _ = model.apply({**variables, "params": params}, x, train=True,
                                                mutable=["batch_stats"])
            return jnp.mean(jnp.square(restored - x)) + jnp.mean(logits**2)

        return jax.jit(jax.grad(loss))(variables["params"])

    fast, ref = flatten_dict(grads("onednn")), flatten_dict(grads("matmul"))
    # Relative L2 error per parameter, against a floor for the ones whose gradient is
    # rounding noise (a conv bias before BatchNorm has a zero gradient).
    floor = 1e-3 * max(float(np.linalg.norm(b)) for b in ref.values())
    for path, b in ref.items():
        err = float(np.linalg.norm(fast[path] - b)) / max(float(np.linalg.norm(b)), floor)
        assert err < 1e-3, (path, err)


def test_onednn_bfloat16_matches_float32_within_bf16_rounding():
    """bfloat16 operands through the custom calls (float32 accumulation inside oneDNN),
    forward and both gradients, in bfloat16, against float32 XLA on the same values."""
    from transvw_jax.models.layers import conv3d_same

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 6, 4, 3)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 5)) * 0.2, jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((2, 8, 6, 4, 5)), jnp.float32)

    def loss(x, w):
        return (conv3d_same(x, w, "onednn").astype(jnp.float32) * cot).sum()

    def ref(x, w):
        return (conv3d_same(x.astype(jnp.float32), w.astype(jnp.float32), "xla3d") * cot).sum()

    y = conv3d_same(x, w, "onednn")
    assert y.dtype == jnp.bfloat16
    want = conv3d_same(x.astype(jnp.float32), w.astype(jnp.float32), "xla3d")
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))) < 1e-2
    for a, b in zip(jax.grad(loss, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), strict=True):
        assert a.dtype == jnp.bfloat16
        assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b))) < 1e-2


def test_onednn_bfloat16_falls_back_where_the_cpu_has_none():
    """Without AVX-512 (simulated with oneDNN's ISA cap) oneDNN has no bfloat16
    convolution: bfloat16 layers then take the matmul form instead of failing."""
    code = ("import jax.numpy as jnp; from transvw_jax import native; "
            "from transvw_jax.models.layers import conv3d_same; "
            "b = jnp.bfloat16; "
            "y = conv3d_same(jnp.ones((1, 8, 8, 8, 2), b), jnp.ones((3, 3, 3, 2, 4), b), 'onednn'); "
            "print(native.supports_bfloat16(), y.dtype, float(y[0, 4, 4, 4, 0]))")
    env = cpu_env(ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["False", "bfloat16", "54.0"]


def test_onednn_rejects_mismatched_channels():
    from transvw_jax.models.layers import _onednn_call

    x, w = jnp.ones((1, 4, 4, 4, 3)), jnp.ones((3, 3, 3, 2, 5))
    with pytest.raises(Exception, match="input channels differ from the kernel's"):
        jax.block_until_ready(_onednn_call("forward", (1, 4, 4, 4, 5), x, w))


def test_onednn_build_is_cached_and_names_a_missing_library(tmp_path, monkeypatch):
    from transvw_jax import native

    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv(native.ROOT_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(native.OneDNNUnavailable, match="nowhere"):
        native.build(tmp_path)


def test_explicit_onednn_without_the_library_is_a_config_error(tmp_path):
    code = ("from transvw_jax.models import build_model; "
            "build_model({'name': 'unet3d', 'width': 4, 'conv_impl': 'onednn'})")
    env = {**os.environ, "TRANSVW_ONEDNN_ROOT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "model.conv_impl: 'onednn' cannot run here" in out.stderr and str(tmp_path) in out.stderr
    env = cpu_env(TRANSVW_ONEDNN_ROOT=str(tmp_path))
    code = "from transvw_jax.models import build_model; print(build_model({'name': 'unet3d'}).conv_impl)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "matmul"  # auto falls back
