"""The command line: stages, the export stage, checkpoints, and one-line errors."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_export import assert_trees_equal

from transvw_jax import checkpointing, export, stages
from transvw_jax.data import store
from transvw_jax.errors import CheckpointError, ConfigError
from transvw_jax.models import build_model, init_variables

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo  # noqa: E402


def run_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "transvw_jax.main", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The user-facing message: the stderr lines that are not absl log lines."""
    lines = [line for line in proc.stderr.splitlines() if line and not re.match(r"[IWEF]\d{4} ", line)]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def tiny_config(**model):
    """The tiny demo config with only the export stage."""
    config = demo.get_config("runlocal")
    config.stages = ("export",)
    config.model.update(model)
    return config


@pytest.mark.slow
def test_demo_export_from_fresh_init(tmp_path):
    """The CLI writes both files from a fresh init (with a warning), saves the config, and
    keeps what it compiled in the workdir for the next run there."""
    # Without the suite's shared compilation cache: the run keeps its own in the workdir.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path),
                    "--config.model.width=8", "--config.stages=('export',)", env=env)
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "xla_cache").iterdir())  # the initialisation's program
    assert "no checkpoint in" in proc.stderr
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["width"] == 8 and saved["stages"] == ["export"]
    torch = pytest.importorskip("torch")
    from transvw_jax import torch_reference

    state_dict = torch.load(tmp_path / "export" / "transvw.pt", weights_only=True)["state_dict"]
    torch_reference.YNet3D(num_classes=8, width=8).load_state_dict(state_dict, strict=True)
    from_safetensors = export.read_state_dict(tmp_path / "export" / "transvw.safetensors")
    assert from_safetensors.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(value.numpy(), from_safetensors[key])


@pytest.mark.slow
def test_export_stage_uses_the_latest_checkpoint(tmp_path):
    config = tiny_config()
    model = build_model(config.model)
    older, newer = (init_variables(model, jax.random.key(s)) for s in (1, 2))
    checkpointing.save(tmp_path, 3, older)
    checkpointing.save(tmp_path, 7, newer)
    # A step Orbax never finished (killed mid-write) must be ignored.
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234").mkdir()
    stages.run(config, tmp_path)
    exported = export.load(tmp_path / "export" / "transvw.safetensors")
    assert_trees_equal(exported, newer)


@pytest.mark.slow
def test_the_tiny_demo_runs_end_to_end(tmp_path):
    """All four stages of the tiny demo, and everything the README says they leave behind."""
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "volumes").glob("phantom_*.nii.gz"))) == 12
    s = store.open_store(tmp_path / "store")
    assert s.num_classes == 8 and s.num_cubes("train") == 8 * 4 * 3 and s.num_cubes("validation") == 8 * 2
    assert "discover/extract: 12/12 patients" in proc.stderr
    assert "orbax" not in proc.stderr.lower()  # library INFO lines are hidden
    assert (tmp_path / "checkpoints" / "6").is_dir() and any((tmp_path / "best").iterdir())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "eval"] == [3, 6]
    assert {"loss", "rec", "cls", "acc"} <= set(lines[-1])
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    samples = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert samples == ["step_0000003.png", "step_0000006.png"]
    assert "exporting the best checkpoint by validation loss" in proc.stderr
    assert (tmp_path / "export" / "transvw.safetensors").is_file()
    assert "summary:" in proc.stderr and "best validation (step" in proc.stderr
    # discover alone reuses the volumes and the trained auto-encoder
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path),
                    "--config.stages=('discover',)")
    assert proc.returncode == 0, proc.stderr
    assert "discover/autoencoder: reusing" in proc.stderr


def test_discover_without_volumes_exits_1_naming_the_directory(tmp_path):
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path),
                    "--config.stages=('discover',)")
    assert proc.returncode == 1
    assert error_line(proc) == f"error: {tmp_path / 'volumes'}: no such directory"
    assert not (tmp_path / "store").exists()


def test_more_classes_than_training_patients_is_refused_before_the_auto_encoder_trains(tmp_path):
    """12 phantoms (10 for training) cannot give 11 visual words one reference each: one line
    naming the key, before hours of auto-encoder training at the reference size."""
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path),
                    "--config.stages=('synthesize', 'discover')", "--config.model.num_classes=11")
    assert proc.returncode == 2, proc.stderr
    assert error_line(proc).startswith("error: model.num_classes=11 needs as many training patients")
    assert not (tmp_path / "discovery" / "autoencoder").exists()


@pytest.mark.slow
def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    narrow = build_model(tiny_config().model)
    checkpointing.save(tmp_path, 1, init_variables(narrow, jax.random.key(0)))
    expected = (r"checkpoints/1: params/clc_out/bn1/bias has shape \(128,\), "
                r"the configured model needs \(256,\)")
    with pytest.raises(CheckpointError, match=expected):
        stages.run(tiny_config(width=8), tmp_path)
    proc = run_main("--config", "configs/demo.py:runlocal", "--workdir", str(tmp_path),
                    "--config.model.num_classes=5", "--config.stages=('export',)")
    assert proc.returncode == 1
    assert "params/clc_out/fc1/bias has shape (8,), the configured model needs (5,)" in error_line(proc)
    assert not (tmp_path / "export").exists()


def test_pt_is_skipped_without_torch(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch", None)
    with caplog.at_level(logging.WARNING):
        stages.run(tiny_config(), tmp_path)
    assert "transvw-jax[torch]" in caplog.text
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["transvw.safetensors"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/missing.py"], "No such file or directory: 'configs/missing.py'"),
        (["--config", "configs/demo.py", "--config.model.widht=8"],
         "--config.model.widht=8: unknown config key 'widht' in config.model (did you mean 'width'?)"),
        (["--config", "configs/demo.py", "--config.trian.steps=5"],
         "--config.trian.steps=5: unknown config key 'trian' in config (did you mean 'train'?)"),
        (["--config", "configs/demo.py", "--config.model.width=wide"], "--config.model.width=wide"),
        (["--config", "configs/demo.py", "--config.stages=('export','fine_tune')"],
         "config.stages: unknown stage 'fine_tune'"),
        (["--config", "configs/demo.py", "--config.data.cube_shape=(64,64,30)"], "data.cube_shape"),
        (["--config", "configs/demo.py:huge"], "unknown config argument 'huge'"),
        (["--config", "configs/demo.py", "--config.transforms.nonlinear.prob=1.5"],
         "transforms.nonlinear.prob must be a probability in [0, 1], got 1.5"),
        (["--config", "configs/demo.py", "--config.discovery.store.dtype=int8"],
         "discovery.store.dtype: 'int8' is not one of uint16, float16, float32"),
        (["--config", "configs/demo.py"], "missing required flag(s) --workdir"),
    ],
    ids=["missing-file", "unknown-key", "unknown-section", "bad-value", "unknown-stage", "cube-shape",
         "config-arg", "transform-prob", "store-dtype", "no-workdir"],
)
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, message):
    if "--config" in args and "missing required" not in message:
        args = [*args, "--workdir", str(tmp_path / "run")]
    proc = run_main(*args)
    assert proc.returncode == 2
    line = error_line(proc)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "run").exists()  # nothing runs, nothing is written


def test_validate_names_keys():
    config = tiny_config()
    config.export.formats = ("onnx",)
    with pytest.raises(ConfigError, match="export.formats: unknown format 'onnx'"):
        stages.validate(config)
    config = tiny_config()
    config.stages = ()
    with pytest.raises(ConfigError, match="config.stages is empty"):
        stages.validate(config)
