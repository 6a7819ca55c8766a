"""The fast CPU path by default (issue 19): `pip install -e .` brings oneDNN on Linux
x86-64, "auto" picks it when its kernel builds, and otherwise falls back to the matmul form
with one log line that names the reason and the fix."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import cpu_env
from packaging.requirements import Requirement

from transvw_jax import native

REPO = Path(__file__).resolve().parents[1]

LINUX_X86 = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
DARWIN_ARM = {"platform_system": "Darwin", "platform_machine": "arm64", "sys_platform": "darwin"}

# One CPU device (the tests' 8 simulated ones would make "auto" matmul for another reason);
# prints the choice of two models built with "auto" and the log records about the fallback.
AUTO = """
import logging
from transvw_jax.models import build_model
from transvw_jax.models.layers import default_conv_impl
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
choices = [default_conv_impl(), build_model({"name": "unet3d", "width": 4}).conv_impl]
lines = [r.getMessage() for r in records if "oneDNN" in r.getMessage() or "onednn" in r.getMessage()]
print(repr((choices, lines)))
"""


def _auto(**env) -> tuple[list[str], list[str]]:
    env = cpu_env(**env)
    out = subprocess.run([sys.executable, "-c", AUTO], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def _onednn_requirements(requirements: list[str]) -> list[Requirement]:
    return [r for r in map(Requirement, requirements) if r.name.startswith("onednn")]


def test_pyproject_installs_onednn_on_linux_x86_64_only():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    main = _onednn_requirements(project["dependencies"])
    assert sorted(f"{r.name}{r.specifier}" for r in main) == sorted(native.ONEDNN_PIP)
    for r in main:
        assert r.marker is not None, r
        assert r.marker.evaluate(LINUX_X86), r
        assert not r.marker.evaluate(DARWIN_ARM), r
    # The old extra still resolves (an alias of the same marked requirements).
    extra = _onednn_requirements(project["optional-dependencies"]["onednn"])
    assert [str(r) for r in extra] == [str(r) for r in main]


def test_auto_is_onednn_where_the_kernel_builds():
    if reason := native.unavailable_reason():
        pytest.skip(f"oneDNN cannot run here: {reason}")
    choices, lines = _auto()
    assert choices == ["onednn", "onednn"] and lines == []


@pytest.mark.parametrize("env,fix", [
    ({"CXX": "/nonexistent/g++"}, "install g++"),  # no C++ compiler
    ({"CXX": "false"}, "set CXX to another C++17 compiler"),  # a compiler that fails
    ({native.ROOT_ENV: "/nonexistent/onednn"}, "pip install"),  # no headers
])
def test_auto_falls_back_to_matmul_with_one_line(env, fix, tmp_path):
    # An empty kernel cache: a library built earlier by a working compiler would be used.
    choices, lines = _auto(**env, **{native.CACHE_ENV: str(tmp_path)})
    assert choices == ["matmul", "matmul"]
    assert len(lines) == 1, lines
    assert "slower matmul form" in lines[0] and fix in lines[0], lines[0]


def test_explicit_onednn_that_cannot_run_is_a_one_line_config_error(tmp_path):
    """Through the command: the ConfigError comes before any stage runs."""
    env = cpu_env(CXX="/nonexistent/g++")
    out = subprocess.run(
        [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo.py:runlocal",
         "--workdir", str(tmp_path / "run"), "--config.model.conv_impl=onednn"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if "'onednn' cannot run here" in ln]
    assert len(errors) == 1 and "install g++" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
