"""Automatic config values are chosen once, for the training mesh, after the processes
joined; validation has no side effects; a lost process stops the others with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_env

from transvw_jax import multihost, resolve
from transvw_jax.errors import ConfigError
from transvw_jax.resolve import Platform

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import demo  # noqa: E402

CPU1 = Platform(backend="cpu", devices=1, processes=1)
CPU4 = Platform(backend="cpu", devices=4, processes=2)
GPU8 = Platform(backend="gpu", devices=8, processes=1, onednn="not the CPU backend",
                native_elastic="not the CPU backend")


def _resolved(platform: Platform, recorded=None, **overrides):
    config = demo.get_config("runlocal")
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    phrases = resolve.resolve(config, platform, recorded)
    return config, phrases


@pytest.mark.parametrize("platform,conv,elastic", [
    (CPU1, "onednn", "native"),
    (CPU4, "matmul", "xla"),  # a custom call cannot follow a sharded batch
    (GPU8, "xla3d", "xla"),
    (Platform("cpu", 1, 1, onednn="no oneDNN", native_elastic="no g++"), "matmul", "xla"),
])
def test_auto_values_follow_the_mesh(platform, conv, elastic):
    config, phrases = _resolved(platform)
    assert config.model.conv_impl == conv
    assert config.transforms.elastic.impl == elastic
    assert config.transforms.batch_chunk == 0
    assert any(p.startswith(f"model.conv_impl={conv} (") for p in phrases)
    assert '"auto"' not in json.dumps({k: config[k].to_dict() for k in ("model", "transforms")})


def test_explicit_values_that_cannot_run_name_the_key():
    with pytest.raises(ConfigError, match=r"model.conv_impl: 'onednn' cannot run here: not the CPU"):
        _resolved(GPU8, model__conv_impl="onednn")
    config = demo.get_config("runlocal")
    config.transforms.elastic.impl = "native"
    with pytest.raises(ConfigError, match=r"elastic.impl: 'native' runs on the CPU backend, not gpu"):
        resolve.resolve(config, GPU8)
    with pytest.raises(ConfigError, match=r"transforms.elastic.impl: 'native' cannot run here: no C\+\+"):
        resolve.resolve(config, Platform("cpu", 1, 1, native_elastic="no C++ compiler (g++) on PATH"))
    # Explicit values that can run are kept as they are.
    config, phrases = _resolved(CPU4, model__conv_impl="xla3d")
    assert config.model.conv_impl == "xla3d" and "model.conv_impl=xla3d (as configured)" in phrases


def test_a_resumed_run_keeps_what_it_recorded(tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": {"conv_impl": "matmul"}, "transforms": {"elastic": {"impl": "xla"}, "batch_chunk": 0}}))
    recorded = resolve.recorded_values(tmp_path)
    assert recorded == {"model.conv_impl": "matmul", "transforms.elastic.impl": "xla",
                        "transforms.batch_chunk": 0}
    config, phrases = _resolved(CPU1, recorded)  # alone, auto would pick onednn / native
    assert (config.model.conv_impl, config.transforms.elastic.impl) == ("matmul", "xla")
    assert "model.conv_impl=matmul (recorded by the run in this workdir)" in phrases
    # An explicit value wins; a recorded one that cannot run here is chosen again, with a warning.
    config, _ = _resolved(CPU1, recorded, model__conv_impl="xla3d")
    assert config.model.conv_impl == "xla3d"
    config, _ = _resolved(GPU8, {"model.conv_impl": "onednn"})
    assert config.model.conv_impl == "xla3d"
    assert "the recorded 'onednn' cannot run here" in caplog.text
    assert resolve.recorded_values(tmp_path / "nowhere") == {}
    (tmp_path / "config.json").write_text("{not json")
    assert resolve.recorded_values(tmp_path) == {}


def test_validation_starts_no_backend_and_no_compiler():
    """In a multi-process job jax.distributed must be joined before anything touches a
    backend, and the command validates before joining."""
    code = """
import sys
from transvw_jax import native, stages
from transvw_jax.fileio import load_module
from jax._src import xla_bridge
def refuse(*a, **k):
    raise AssertionError("validation compiled a native kernel")
native.build = native.build_elastic = native.unavailable_reason = native.elastic_unavailable_reason = refuse
for name, arg in [("demo", None), ("demo", "runlocal"), ("demo_finetune", None), ("luna16_transvw", None),
                  ("luna16_genesis", None), ("tpu_pod", None)]:
    config = load_module(f"configs/{name}.py", f"c_{name}").get_config(arg)
    config.model.conv_impl = "onednn"  # explicit values are checked later, on the platform
    if "transforms" in config:
        config.transforms.elastic.impl = "native"
    if name == "demo_finetune":  # its pretrained run does not exist here
        config.stages, config.finetune.init = ("synthesize_labeled", "finetune"), "scratch"
    stages.validate(config)
assert not xla_bridge.backends_are_initialized(), "validation started a JAX backend"
print("ok")
"""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_the_command_records_resolved_values_and_reuses_them(tmp_path):
    """Through the public door: config.json shows no "auto"; a second run in the same
    workdir, on another mesh, keeps the first run's choices."""
    def run(devices: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo.py:runlocal",
             "--workdir", str(tmp_path), "--config.stages=('synthesize',)"],
            cwd=REPO, env=cpu_env(devices), capture_output=True, text=True)

    first = run(2)
    assert first.returncode == 0, first.stderr[-2000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert '"auto"' not in json.dumps(saved) and "-1" not in json.dumps(saved["transforms"])
    assert saved["model"]["conv_impl"] == "matmul" and saved["parallel"]["distributed"] == "off"
    assert ("resolved for 2 cpu device(s) in 1 process(es): model.conv_impl=matmul (2 CPU devices"
            in first.stderr)
    second = run(1)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "model.conv_impl=matmul (recorded by the run in this workdir)" in second.stderr
    assert json.loads((tmp_path / "config.json").read_text())["model"]["conv_impl"] == "matmul"


class FakeBeats:
    def __init__(self):
        self.values: dict[int, str] = {}
        self.down = False

    def beat(self, index, value):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        self.values[index] = value

    def read(self):
        if self.down:
            raise RuntimeError("UNAVAILABLE: Socket closed")
        return dict(self.values)


def _watchdog(beats, clock, index=0, count=3):
    reports, exits = [], []
    dog = multihost.Watchdog(10, index=index, count=count, beats=beats, report=reports.append,
                             exit=exits.append, clock=lambda: clock[0])
    return dog, reports, exits


def test_watchdog_names_a_process_whose_heartbeat_stopped():
    beats, clock = FakeBeats(), [0.0]
    dog, reports, exits = _watchdog(beats, clock, index=1)
    for t in range(0, 30, 2):
        clock[0] = float(t)
        beats.values[0] = str(t)  # process 0 keeps beating; process 2 never moves after t=4
        if t <= 4:
            beats.values[2] = str(t)
        lost = dog.check()
        if t <= 14:
            assert lost is None, t
    assert lost == [2]
    dog._stop_process(lost)
    assert exits == [1] and len(reports) == 1
    assert reports[0].startswith("lost process 2 of 3 (no heartbeat for 10 s): stopping process 1.")


def test_watchdog_ignores_processes_that_ended_on_purpose_and_names_a_lost_coordinator():
    beats, clock = FakeBeats(), [0.0]
    dog, reports, exits = _watchdog(beats, clock, index=2)
    beats.values.update({0: "1", 1: multihost.Watchdog.DONE})
    for t in range(0, 40, 5):
        clock[0] = float(t)
        beats.values[0] = str(t)
        assert dog.check() is None
    beats.down = True
    lost = dog.check()
    assert lost == [0]
    dog._stop_process(lost)
    assert "lost process 0 (the coordinator) of 3 (its coordination service is unreachable)" in reports[0]


def test_errors_that_may_come_from_a_lost_process():
    import jax

    assert multihost.may_be_a_lost_process(RuntimeError("Gloo all-reduce failed: Connection reset by peer"))
    assert multihost.may_be_a_lost_process(jax.errors.JaxRuntimeError("UNKNOWN: whatever"))
    assert not multihost.may_be_a_lost_process(ConfigError("model.width must be a positive integer"))
    assert not multihost.may_be_a_lost_process(ValueError("shapes differ"))
