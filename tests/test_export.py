"""Flax <-> PyTorch: exact round trip, parity with the reference networks, clear errors."""

import logging
import sys

import jax
import numpy as np
import pytest
from conftest import jit_apply, random_cubes, zeros_like_model
from flax.traverse_util import flatten_dict

from transvw_jax import export
from transvw_jax.errors import CheckpointError
from transvw_jax.models import UNet3D, YNet3D, abstract_variables, init_variables


def assert_trees_equal(a, b):
    fa, fb = flatten_dict(dict(a)), flatten_dict(dict(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg="/".join(k))


def to_torch_layout(x):
    return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))


def test_round_trip_is_exact(small_ynet):
    _, variables = small_ynet
    assert_trees_equal(export.from_torch_state_dict(export.to_torch_state_dict(variables)), variables)


@pytest.mark.slow
def test_state_dict_has_the_reference_keys_and_shapes():
    variables = zeros_like_model(YNet3D(num_classes=44))
    sd = export.to_torch_state_dict(variables)
    assert len(sd) == 115
    assert len(export.to_torch_state_dict(variables, head=False)) == 106
    assert sd["down_tr64.ops.0.conv1.weight"].shape == (32, 1, 3, 3, 3)
    assert sd["up_tr256.up_conv.weight"].shape == (512, 512, 2, 2, 2)
    assert sd["up_tr256.ops.0.conv1.weight"].shape == (256, 768, 3, 3, 3)
    assert sd["clc_out.fc1.weight"].shape == (44, 1024)
    assert sd["out_tr.final_conv.weight"].shape == (1, 64, 1, 1, 1)
    nbt = sd["down_tr512.ops.1.bn1.num_batches_tracked"]
    assert nbt.dtype == np.int64 and nbt.shape == ()
    torch = pytest.importorskip("torch")
    from transvw_jax import torch_reference

    reference = torch_reference.YNet3D(num_classes=44)
    assert list(reference.state_dict()) == list(sd)  # same keys, same order
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


@pytest.mark.parametrize("torch_mode", ["train", "eval"])
def test_pt_export_matches_the_pytorch_reference(tmp_path, small_ynet, torch_mode):
    """The .pt file loads strictly into the reference YNet3D and UNet3D and gives the same
    restoration and class probabilities (reference BatchNorm: same in train and eval)."""
    torch = pytest.importorskip("torch")
    from transvw_jax import torch_reference

    model, variables = small_ynet
    path = export.save(tmp_path / "transvw.pt", variables)
    state_dict = torch.load(path, weights_only=True)["state_dict"]
    x = random_cubes((2, 16, 16, 8, 1), seed=7)
    restoration, logits = jit_apply(model)(variables, x, train=False)

    ynet = torch_reference.YNet3D(num_classes=6, width=4)
    ynet.load_state_dict(state_dict, strict=True)
    getattr(ynet, torch_mode)()
    with torch.no_grad():
        t_restoration, t_logits = ynet(torch.from_numpy(to_torch_layout(x)))
    np.testing.assert_allclose(t_restoration.numpy(), to_torch_layout(np.asarray(restoration)), atol=1e-4)
    np.testing.assert_allclose(t_logits.softmax(1).numpy(), jax.nn.softmax(logits), atol=1e-4)

    unet = torch_reference.UNet3D(width=4)
    unet.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("clc_out.")}, strict=True)
    getattr(unet, torch_mode)()
    with torch.no_grad():
        u_restoration = unet(torch.from_numpy(to_torch_layout(x)))
    np.testing.assert_allclose(u_restoration.numpy(), to_torch_layout(np.asarray(restoration)), atol=1e-4)


@pytest.mark.slow
def test_full_width_parity_with_the_reference():
    """Width 32, the released architecture, on a small cube."""
    torch = pytest.importorskip("torch")
    from transvw_jax import torch_reference

    model = YNet3D(num_classes=44)
    variables = init_variables(model, jax.random.key(3))
    reference = torch_reference.YNet3D(num_classes=44).eval()
    sd = export.to_torch_state_dict(variables)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = random_cubes((2, 16, 16, 8, 1), seed=8)
    restoration, logits = jit_apply(model)(variables, x, train=False)
    with torch.no_grad():
        t_restoration, t_logits = reference(torch.from_numpy(to_torch_layout(x)))
    np.testing.assert_allclose(t_restoration.numpy(), to_torch_layout(np.asarray(restoration)), atol=1e-4)
    np.testing.assert_allclose(t_logits.softmax(1).numpy(), jax.nn.softmax(logits), atol=1e-4)


def test_pytorch_weights_import_into_flax(small_ynet):
    """Weights initialised by PyTorch (not by us) give the same outputs after import."""
    torch = pytest.importorskip("torch")
    from transvw_jax import torch_reference

    torch.manual_seed(0)
    reference = torch_reference.YNet3D(num_classes=6, width=4)
    x = random_cubes(seed=11)
    reference.train()
    with torch.no_grad():
        reference(torch.from_numpy(to_torch_layout(x)))  # move the running statistics
        t_restoration, t_logits = reference(torch.from_numpy(to_torch_layout(x)))
    model, _ = small_ynet
    released = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    variables = export.from_torch_state_dict(released["state_dict"], like=abstract_variables(model))
    restoration, logits = jit_apply(model)(variables, x, train=False)
    np.testing.assert_allclose(to_torch_layout(np.asarray(restoration)), t_restoration.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, t_logits.numpy(), atol=1e-4)
    np.testing.assert_array_equal(
        variables["batch_stats"]["down_tr64"]["ops_0"]["bn1"]["mean"],
        reference.down_tr64.ops[0].bn1.running_mean.numpy(),
    )


def test_module_prefix_is_removed(small_ynet):
    _, variables = small_ynet
    sd = {f"module.{k}": v for k, v in export.to_torch_state_dict(variables).items()}
    assert_trees_equal(export.from_torch_state_dict(sd), variables)


def test_missing_head_is_taken_from_the_model(small_ynet, caplog):
    """Models Genesis (U-Net only) weights load into YNet3D; the head stays initialised."""
    model, variables = small_ynet
    fresh = init_variables(model, jax.random.key(42))
    unet_only = export.to_torch_state_dict(variables, head=False)
    with caplog.at_level(logging.WARNING):
        loaded = export.from_torch_state_dict(unet_only, like=fresh)
    assert "clc_out.fc1.weight" in caplog.text
    assert_trees_equal(loaded["params"]["clc_out"], fresh["params"]["clc_out"])
    assert_trees_equal(loaded["params"]["down_tr64"], variables["params"]["down_tr64"])
    assert_trees_equal(loaded["batch_stats"]["up_tr64"], variables["batch_stats"]["up_tr64"])


def test_missing_head_needs_initialised_values(small_ynet):
    model, variables = small_ynet
    unet_only = export.to_torch_state_dict(variables, head=False)
    with pytest.raises(CheckpointError, match=r"missing keys clc_out\..*pass initialised variables"):
        export.from_torch_state_dict(unet_only, like=abstract_variables(model))


def test_extra_keys_are_named(small_ynet, caplog):
    _, variables = small_ynet
    sd = export.to_torch_state_dict(variables)
    like = abstract_variables(UNet3D(width=4))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*clc_out\.fc1\.weight"):
        export.from_torch_state_dict(sd, like=like)
    with caplog.at_level(logging.WARNING):
        loaded = export.from_torch_state_dict(sd, like=like, strict=False)
    assert "clc_out.conv1.weight" in caplog.text
    assert "clc_out" not in loaded["params"]


def test_missing_encoder_keys_fail_strictly(small_ynet):
    _, variables = small_ynet
    sd = export.to_torch_state_dict(variables)
    del sd["down_tr128.ops.1.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: down_tr128\.ops\.1\.conv1\.weight"):
        export.from_torch_state_dict(sd, like=variables)


def test_shape_mismatch_names_the_key(small_ynet):
    _, variables = small_ynet
    sd = export.to_torch_state_dict(variables)
    like = abstract_variables(YNet3D(num_classes=9, width=4))
    with pytest.raises(CheckpointError, match=r"clc_out\.fc1\.weight \(6, 128\) != expected \(9, 128\)"):
        export.from_torch_state_dict(sd, like=like)
    wider = abstract_variables(YNet3D(num_classes=6, width=8))
    with pytest.raises(CheckpointError, match=r"down_tr64\.ops\.0\.conv1\.weight \(4, 1, 3, 3, 3\)"):
        export.from_torch_state_dict(sd, like=wider)


def test_unknown_key_is_named():
    with pytest.raises(CheckpointError, match="encoder.fancy.gamma"):
        export.from_torch_state_dict({"encoder.fancy.gamma": np.ones(3)})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_round_trip(tmp_path, small_ynet, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch")
    model, variables = small_ynet
    path = export.save(tmp_path / f"w{suffix}", variables)
    assert_trees_equal(export.load(path, like=abstract_variables(model)), variables)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file_names_the_file(tmp_path, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch")
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=f"broken{suffix}: not a readable") as info:
        export.load(path)
    assert "\n" not in str(info.value)


def test_truncated_export_names_the_file(tmp_path, small_ynet):
    _, variables = small_ynet
    path = export.save(tmp_path / "w.safetensors", variables)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="w.safetensors: not a readable"):
        export.load(path)


def test_missing_file_and_unknown_suffix(tmp_path, small_ynet):
    with pytest.raises(CheckpointError, match="nothing.pt: no such file"):
        export.load(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match=r"w\.npz: unknown format"):
        export.save(tmp_path / "w.npz", small_ynet[1])


class _Payload:
    """Unpickling this would create a file: torch.load(weights_only=True) must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pt_import_never_unpickles_arbitrary_objects(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="evil.pt: not a readable PyTorch weights file"):
        export.load(path)
    assert not marker.exists()


def test_safetensors_needs_no_torch(tmp_path, small_ynet, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    model, variables = small_ynet
    path = export.save(tmp_path / "w.safetensors", variables)
    assert_trees_equal(export.load(path, like=abstract_variables(model)), variables)
    with pytest.raises(CheckpointError, match=r"w\.pt: .pt files need PyTorch.*\[torch\]"):
        export.save(tmp_path / "w.pt", variables)


def test_failed_write_leaves_nothing_behind(tmp_path, small_ynet, monkeypatch):
    import safetensors.numpy

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export.save(tmp_path / "w.safetensors", small_ynet[1])
    assert list(tmp_path.iterdir()) == []
