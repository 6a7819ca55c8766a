"""Keras .h5 releases -> Flax, and the convert command.

The .h5 files are written here with h5py in the layout Keras 2 writes (layer_names,
weight_names, `<layer>/<layer>/kernel:0`), with the original layer names of Models Genesis
`keras/unet3d.py` and TransVW `keras/models/ynet3d.py`, at width 4. The converted network
is checked against a numpy forward pass of the Keras model (channels first, BN on moving
statistics with Keras's epsilon, UpSampling3D or Conv3DTranspose, concat [up, skip]).
"""

import json
import logging
import os
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from conftest import jit_apply, random_cubes
from flax.traverse_util import flatten_dict

from transvw_jax import checkpointing, convert, export, finetune
from transvw_jax.errors import CheckpointError
from transvw_jax.models import EncoderClassifier, UNet3D, YNet3D, init_variables

WIDTH = 4
SHAPE = (2, 16, 16, 8, 1)  # channels last (ours); the Keras model sees (2, 1, 16, 16, 8)


# --------------------------------------------------------------------------- Keras model
def keras_layers(seed=0, width=WIDTH, in_channels=1, n_labels=1, deconvolution=False, head=None,
                 final_name="conv3d_1", activation_name="activation_1"):
    """[(name, class_name, [(weight short name, array)])] in the Keras model's creation order.

    `head`: number of classes of a TransVW head (conv 16*width, BN, Dense(32*width), Dense).
    """
    rng = np.random.default_rng(seed)
    layers = [("input_1", "InputLayer", [])]
    counters = {"max_pooling3d": 0, "up_sampling3d": 0, "concatenate": 0, "conv3d_transpose": 0}

    def auto(kind):
        counters[kind] += 1
        return f"{kind}_{counters[kind]}"

    def block(i, cin, cout):
        # He-scaled kernels and BN statistics near the activations' keep values O(1).
        kernel = rng.normal(0, np.sqrt(2 / (27 * cin)), (3, 3, 3, cin, cout)).astype(np.float32)
        bias = rng.normal(0, 0.05, cout).astype(np.float32)
        bn = [("gamma", rng.uniform(0.5, 1.5, cout)), ("beta", rng.normal(0, 0.1, cout)),
              ("moving_mean", rng.normal(0, 0.2, cout)), ("moving_variance", rng.uniform(0.3, 2.0, cout))]
        layers.append((f"depth_{i}_conv", "Conv3D", [("kernel", kernel), ("bias", bias)]))
        layers.append((f"depth_{i}_bn", "BatchNormalization", [(n, v.astype(np.float32)) for n, v in bn]))
        layers.append((f"depth_{i}_relu", "Activation", []))

    n, cin = 0, in_channels
    for level in range(4):
        for cout in (width * 2**level, width * 2 ** (level + 1)):
            block(n, cin, cout)
            n, cin = n + 1, cout
        if level < 3:
            layers.append((auto("max_pooling3d"), "MaxPooling3D", []))
    for level in (2, 1, 0):
        skip = width * 2 ** (level + 1)
        if deconvolution:  # Conv3DTranspose kernel (kx, ky, kz, out, in), out = in
            k = rng.normal(0, np.sqrt(1 / cin), (2, 2, 2, cin, cin)).astype(np.float32)
            layers.append((auto("conv3d_transpose"), "Conv3DTranspose",
                           [("kernel", k), ("bias", rng.normal(0, 0.05, cin).astype(np.float32))]))
        else:
            layers.append((auto("up_sampling3d"), "UpSampling3D", []))
        layers.append((auto("concatenate"), "Concatenate", []))
        block(n, cin + skip, skip)
        block(n + 1, skip, skip)
        n, cin = n + 2, skip
    final = rng.normal(0, np.sqrt(1 / cin), (1, 1, 1, cin, n_labels)).astype(np.float32)
    layers.append((final_name, "Conv3D", [("kernel", final), ("bias", np.full(n_labels, 0.1, np.float32))]))
    layers.append((activation_name, "Activation", []))
    if head:
        block(n, 16 * width, 16 * width)
        layers.append(("global_average_pooling3d_1", "GlobalAveragePooling3D", []))
        for name, cin_, cout in (("cls_fc", 16 * width, 32 * width), ("cls_output", 32 * width, head)):
            layers.append((name, "Dense", [("kernel", rng.normal(0, 0.1, (cin_, cout)).astype(np.float32)),
                                           ("bias", np.zeros(cout, np.float32))]))
    return layers


def write_h5(path, layers, full_model=False, epsilons=None, order=None):
    """Write `layers` as Keras 2 does: model.save (full_model) or model.save_weights."""
    epsilons = epsilons or {}
    listed = [layers[i] for i in order] if order is not None else layers
    with h5py.File(path, "w") as f:
        group = f.create_group("model_weights") if full_model else f
        group.attrs["layer_names"] = np.array([name.encode() for name, _, _ in listed])
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.2.4"
        for name, _, weights in listed:
            g = group.create_group(name)
            g.attrs["weight_names"] = np.array([f"{name}/{w}:0".encode() for w, _ in weights])
            for w, value in weights:
                g.create_dataset(f"{name}/{w}:0", data=value)
        if full_model:
            config = {"class_name": "Model", "config": {"name": "model_1", "layers": [
                {"name": name, "class_name": cls,
                 "config": {"name": name, **({"epsilon": epsilons.get(name, 0.001), "momentum": 0.99,
                                              "axis": 1} if cls == "BatchNormalization" else {})}}
                for name, cls, _ in layers]}}
            f.attrs["model_config"] = json.dumps(config).encode()
            f.attrs["keras_version"] = b"2.2.4"
            f.create_group("optimizer_weights")
    return path


def keras_forward(layers, x_cl, epsilons=None):
    """Numpy float64 forward of the Keras U-Net (channels first) on x (B, X, Y, Z, C); returns
    the final conv's output before the sigmoid, channels last."""
    w = {name: dict(weights) for name, _, weights in layers}
    epsilons = epsilons or {}
    x = np.moveaxis(x_cl.astype(np.float64), -1, 1)

    def conv_same(x, kernel, bias):
        k = kernel.shape[0]
        h = k // 2
        xp = np.pad(x, ((0, 0), (0, 0), (h, h), (h, h), (h, h)))
        _, _, sx, sy, sz = x.shape
        out = sum(np.einsum("bcxyz,co->boxyz", xp[:, :, i:i + sx, j:j + sy, m:m + sz], kernel[i, j, m])
                  for i in range(k) for j in range(k) for m in range(k))
        return out + bias[None, :, None, None, None]

    def block(x, i):
        c, b = w[f"depth_{i}_conv"], w[f"depth_{i}_bn"]
        y = conv_same(x, c["kernel"], c["bias"])
        eps = epsilons.get(f"depth_{i}_bn", 1e-3)
        shape = (1, -1, 1, 1, 1)
        y = (y - b["moving_mean"].reshape(shape)) / np.sqrt(b["moving_variance"].reshape(shape) + eps)
        y = y * b["gamma"].reshape(shape) + b["beta"].reshape(shape)
        return np.maximum(y, 0)

    def pool(x):
        b, c, sx, sy, sz = x.shape
        return x.reshape(b, c, sx // 2, 2, sy // 2, 2, sz // 2, 2).max(axis=(3, 5, 7))

    ups = [name for name, cls, _ in layers if cls == "Conv3DTranspose"]
    skips, n = [], 0
    for level in range(4):
        x = block(block(x, n), n + 1)
        n += 2
        if level < 3:
            skips.append(x)
            x = pool(x)
    for j, level in enumerate((2, 1, 0)):
        if ups:
            k = w[ups[j]]
            b_, c, sx, sy, sz = x.shape
            up = np.einsum("bcxyz,ijmoc->boxiyjzm", x, k["kernel"]).reshape(b_, -1, 2 * sx, 2 * sy, 2 * sz)
            up = up + k["bias"][None, :, None, None, None]
        else:
            up = x.repeat(2, axis=2).repeat(2, axis=3).repeat(2, axis=4)
        x = np.concatenate([up, skips[level]], axis=1)
        x = block(block(x, n), n + 1)
        n += 2
    final = next(name for name, cls, weights in layers if weights and weights[0][1].shape[:3] == (1, 1, 1))
    y = conv_same(x, w[final]["kernel"], w[final]["bias"])
    return np.moveaxis(y, 1, -1)


def logits_of(variables, x, n_labels=1):
    model = UNet3D(out_channels=n_labels, width=WIDTH, bn="standard", activation="none")
    return np.asarray(jit_apply(model)(variables, x, train=False))


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(dict(a)), flatten_dict(dict(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


@pytest.fixture(scope="module")
def genesis_h5(tmp_path_factory):
    """A Models Genesis style save_weights file (UpSampling3D decoder) and its layers."""
    layers = keras_layers(seed=0)
    return write_h5(tmp_path_factory.mktemp("keras") / "Genesis_Chest_CT.h5", layers), layers


# --------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("kind", ["save_weights", "full_model"])
def test_models_genesis_h5_matches_the_keras_forward(tmp_path, genesis_h5, kind):
    if kind == "save_weights":
        path, layers = genesis_h5
        epsilons = None
    else:  # the whole-model save's config carries each BN's epsilon: it is used
        layers = keras_layers(seed=1)
        epsilons = {"depth_3_bn": 0.01, "depth_12_bn": 1e-4}
        path = write_h5(tmp_path / "model.h5", layers, full_model=True, epsilons=epsilons)
    variables = export.load(path)
    assert sorted(variables["params"]) == ["down_tr128", "down_tr256", "down_tr512", "down_tr64",
                                           "out_tr", "up_tr128", "up_tr256", "up_tr64"]
    x = random_cubes(SHAPE, seed=3)
    expected = keras_forward(layers, x, epsilons)
    assert np.abs(expected).max() > 0.1  # not a degenerate (all-zero) comparison
    np.testing.assert_allclose(logits_of(variables, x), expected, rtol=1e-4, atol=1e-4)
    # The restoration (sigmoid) of the default UNet3D, same parameters.
    restoration = jit_apply(UNet3D(width=WIDTH, bn="standard"))(variables, x, train=False)
    np.testing.assert_allclose(np.asarray(restoration), 1 / (1 + np.exp(-expected)), atol=1e-5)


def test_batchnorm_epsilon_is_folded_into_the_variance(genesis_h5):
    path, layers = genesis_h5
    moving_variance = dict(dict((n, w) for n, _, w in layers)["depth_5_bn"])["moving_variance"]
    stored = export.load(path)["batch_stats"]["down_tr256"]["ops_1"]["bn1"]["var"]
    np.testing.assert_allclose(stored, moving_variance + (1e-3 - 1e-5), rtol=1e-6)


def test_deconvolution_decoder_matches_the_keras_forward(tmp_path):
    layers = keras_layers(seed=2, deconvolution=True, n_labels=2)
    path = write_h5(tmp_path / "deconv.hdf5", layers)
    variables = export.load(path)
    x = random_cubes(SHAPE, seed=4)
    np.testing.assert_allclose(logits_of(variables, x, n_labels=2), keras_forward(layers, x),
                               rtol=1e-4, atol=1e-4)


def test_transvw_h5_converts_the_unet_and_names_the_dropped_head(tmp_path, caplog):
    layers = keras_layers(seed=5, head=6, final_name="final_conv", activation_name="reconst_output")
    # Keras lists a model's layers by graph depth: the head's layers sit among the decoder's.
    names = [name for name, _, _ in layers]
    head = [names.index(n) for n in ("depth_14_conv", "depth_14_bn", "depth_14_relu",
                                     "global_average_pooling3d_1", "cls_fc", "cls_output")]
    rest = [i for i in range(len(layers)) if i not in head]
    at = names.index("up_sampling3d_1")
    path = write_h5(tmp_path / "TransVW_chest_ct.h5", layers, full_model=True,
                    order=rest[:at] + head + rest[at:])
    with caplog.at_level(logging.WARNING):
        variables = export.load(path)
    assert "clc_out" not in variables["params"]
    assert "depth_14_conv, depth_14_bn, cls_fc, cls_output" in caplog.text
    x = random_cubes(SHAPE, seed=6)
    np.testing.assert_allclose(logits_of(variables, x), keras_forward(layers, x), rtol=1e-4, atol=1e-4)
    # Into YNet3D: the U-Net from the file, the head from the initialisation (logged).
    ynet = YNet3D(num_classes=6, width=WIDTH)
    fresh = init_variables(ynet, jax.random.key(0))
    merged = export.load(path, like=fresh)
    np.testing.assert_array_equal(merged["params"]["clc_out"]["fc1"]["kernel"],
                                  fresh["params"]["clc_out"]["fc1"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["up_tr64"]["ops_1"]["conv1"]["kernel"],
                                  variables["params"]["up_tr64"]["ops_1"]["conv1"]["kernel"])


def test_auto_numbered_names_map_by_structure(tmp_path, genesis_h5):
    """Layers named by Keras's counters, with an offset (another session built models
    first) and listed in another order, convert to the same variables."""
    path, layers = genesis_h5
    rename = {}
    for name, cls, _ in layers:
        if name.startswith("depth_") and cls == "Conv3D":
            rename[name] = f"conv3d_{int(name.split('_')[1]) + 17}"
        elif name.startswith("depth_") and cls == "BatchNormalization":
            rename[name] = f"batch_normalization_{int(name.split('_')[1]) + 5}"
    rename["conv3d_1"] = "conv3d_40"
    renamed = [(rename.get(n, n), c, w) for n, c, w in layers]
    order = list(np.random.default_rng(0).permutation(len(renamed)))
    other = write_h5(tmp_path / "auto.h5", renamed, order=order)
    assert_trees_equal(export.load(other), export.load(path))


def test_nested_model_layer_is_split_by_weight_names(tmp_path, genesis_h5):
    """A U-Net saved as one layer of a wrapper model (multi_gpu_model): one group, whose
    weight names say which inner layer each array belongs to."""
    path, layers = genesis_h5
    with h5py.File(tmp_path / "wrapped.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"input_1", b"model_1"])
        f.create_group("input_1").attrs["weight_names"] = np.array([])
        g = f.create_group("model_1")
        names = [f"{name}/{w}:0" for name, _, weights in layers for w, _ in weights]
        g.attrs["weight_names"] = np.array([n.encode() for n in names])
        for name, _, weights in layers:
            for w, value in weights:
                g.create_dataset(f"{name}/{w}:0", data=value)
    assert_trees_equal(export.load(tmp_path / "wrapped.h5"), export.load(path))


def test_encoder_only_file_gives_the_encoder(tmp_path, caplog):
    layers = keras_layers(seed=7)
    cut = [n for n, _, _ in layers].index("up_sampling3d_1")
    encoder = layers[:cut] + [("global_average_pooling3d_1", "GlobalAveragePooling3D", []),
                              ("dense_1", "Dense", [("kernel", np.ones((64, 3), np.float32)),
                                                    ("bias", np.zeros(3, np.float32))])]
    path = write_h5(tmp_path / "encoder.h5", encoder)
    with caplog.at_level(logging.WARNING):
        variables = export.load(path)
    assert sorted(variables["params"]) == ["down_tr128", "down_tr256", "down_tr512", "down_tr64"]
    assert "dense_1" in caplog.text
    model = EncoderClassifier(num_classes=2, width=WIDTH)
    loaded = export.load(path, like=init_variables(model, jax.random.key(0)), strict=False)
    assert "clc_out" in loaded["params"]


# --------------------------------------------------------------------------- errors
def one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        export.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_not_hdf5_and_truncated_files(tmp_path, genesis_h5):
    text = tmp_path / "weights.h5"
    text.write_text("not an hdf5 file\n" * 20)
    one_line_error(text, "not an HDF5 file")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(genesis_h5[0].read_bytes()[:4000])
    one_line_error(truncated, "truncated.h5: (unreadable HDF5|not an HDF5)")
    one_line_error(tmp_path / "missing.h5", "no such file")


def test_wrong_architecture_is_named(tmp_path):
    layers = keras_layers(seed=8)
    # A conv of another width in the decoder.
    bad = [(n, c, [("kernel", np.zeros((3, 3, 3, 48, 5), np.float32)), ("bias", np.zeros(5, np.float32))])
           if n == "depth_9_conv" else (n, c, w) for n, c, w in layers]
    one_line_error(write_h5(tmp_path / "wide.h5", bad), r"'depth_9_conv' has kernel \(3, 3, 3, 48, 5\)")
    # Depth 3: too few blocks.
    shallow = [layer for layer in layers if not layer[0].startswith(("depth_12", "depth_13"))]
    one_line_error(write_h5(tmp_path / "shallow.h5", shallow), "do not fit the Keras U-Net")
    # No Conv3D at all (an HDF5 file of something else).
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"dense_1"])
        f.create_group("dense_1").attrs["weight_names"] = np.array([b"dense_1/kernel:0"])
        f["dense_1"].create_dataset("dense_1/kernel:0", data=np.ones((3, 4)))
    one_line_error(tmp_path / "other.h5", "no 3x3x3 Conv3D layers")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.ones(3))
    one_line_error(tmp_path / "plain.h5", "not a Keras 2 weight file")
    # No BatchNormalization: the original's batch_normalization=False.
    no_bn = [layer for layer in layers if not layer[0].endswith("_bn")]
    one_line_error(write_h5(tmp_path / "nobn.h5", no_bn), "no BatchNormalization layers")


def test_missing_h5py_names_the_extra(tmp_path, genesis_h5, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    one_line_error(genesis_h5[0], r"pip install 'transvw-jax\[keras\]'")


# --------------------------------------------------------------------------- the command
def run_convert(*args):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "transvw_jax.convert", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_h5_to_safetensors(tmp_path, genesis_h5):
    path, _ = genesis_h5
    out = tmp_path / "genesis.safetensors"
    result = run_convert(path, out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "safetensors" in lines[0] and "arrays" in lines[0] and "parameters" in lines[0]
    assert_trees_equal(export.load(out), export.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["genesis.safetensors"]  # no temporary files


def test_cli_bad_inputs_exit_with_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)  # an HDF5 signature, nothing behind it
    result = run_convert(bad, tmp_path / "out.safetensors")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.h5" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_h5_to_orbax_to_finetuning(tmp_path, genesis_h5, capsys):
    path, _ = genesis_h5
    out = tmp_path / "genesis_ckpt"
    assert convert.main([str(path), str(out)]) == 0
    assert "Orbax checkpoint" in capsys.readouterr().out
    where, step, variables = checkpointing.read_stored_variables(out)
    assert step == 0
    assert_trees_equal(variables, export.load(path))
    _, pretrained = finetune.read_pretrained(out)  # finetune.pretrained=OUT
    assert_trees_equal(pretrained, variables)
    _, direct = finetune.read_pretrained(path)  # finetune.pretrained=file.h5
    assert_trees_equal(direct, variables)
    # The workdir is an input too, and a second write into it is refused.
    again = tmp_path / "again.safetensors"
    assert convert.main([str(out), str(again), "--no-head"]) == 0
    assert_trees_equal(export.load(again), variables)
    assert convert.main([str(path), str(out)]) == 1
    assert "already holds checkpoints" in capsys.readouterr().err


def test_head_flag_and_pt_output(tmp_path, small_ynet, capsys):
    torch = pytest.importorskip("torch")
    _, variables = small_ynet
    src = export.save(tmp_path / "ynet.safetensors", variables)
    assert convert.main([str(src), str(tmp_path / "unet.pt"), "--no-head"]) == 0
    state_dict = torch.load(tmp_path / "unet.pt", weights_only=True)["state_dict"]
    assert state_dict and not any(k.startswith("clc_out.") for k in state_dict)
    assert convert.main([str(src), str(tmp_path / "ynet.pt")]) == 0
    assert_trees_equal(export.load(tmp_path / "ynet.pt"), variables)
    assert capsys.readouterr().out.count("wrote") == 2


@pytest.mark.parametrize("argv, match", [
    (["a.h5"], "the following arguments are required"),
    (["{h5}", "out.npz"], "unknown output format"),
    (["{txt}", "out.safetensors"], "unknown input format"),
])
def test_usage_errors_exit_2(tmp_path, genesis_h5, capsys, argv, match):
    txt = tmp_path / "w.txt"
    txt.write_text("x")
    argv = [a.format(h5=genesis_h5[0], txt=txt) for a in argv]
    assert convert.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]


def test_missing_input_exits_1(tmp_path, capsys):
    assert convert.main([str(tmp_path / "nothing.h5"), str(tmp_path / "o.safetensors")]) == 1
    assert "nothing.h5: no such file" in capsys.readouterr().err


def test_pt_output_without_torch_is_one_line(tmp_path, genesis_h5, capsys, monkeypatch):
    monkeypatch.setattr(convert.importlib.util, "find_spec", lambda name: None)
    assert convert.main([str(genesis_h5[0]), str(tmp_path / "w.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'transvw-jax[torch]'" in err[0]
    assert not (tmp_path / "w.pt").exists()
