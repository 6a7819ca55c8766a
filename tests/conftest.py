"""Shared fixtures. Simulated CPU devices must be requested before jax is imported."""

import os
import subprocess
import time
from pathlib import Path

# XLA's older CPU fusion codegen (its fallback to the newer MLIR emitters): the same
# programs compile in about two thirds of the CPU time, and tests compile far more than
# they run. Subprocesses inherit it; ones on another device count take `cpu_env`.
# XLA stops at start-up on a flag it does not know: this one exists in the jax 0.10 that
# pyproject.toml pins.
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling is most of the suite's time, and the tests and their subprocesses
# (`python -m transvw_jax.main ...`) compile the same small programs again and again: one
# persistent cache compiles each once per checkout, and makes the edit loop's reruns fast.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# JAX's switch for programs that run less than they take to compile (the tests' few small
# steps): LLVM at -O0 and no expensive passes. The XLA graph passes (fusion, sharding) are
# the users'; the LLVM-compiled kernels are slower, and compiled in half the time.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from transvw_jax.models import YNet3D, abstract_variables, init_variables  # noqa: E402


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment for a subprocess on `devices` simulated CPU devices (the suite's 8
    dropped), compiling with the tests' flags; `extra` variables on top."""
    count = f"--xla_force_host_platform_device_count={devices} " if devices > 1 else ""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": count + TEST_XLA_FLAGS, **extra}


def random_cubes(shape=(2, 16, 16, 8, 1), seed=0) -> np.ndarray:
    """Cubes with values in [0, 1], like normalised CT."""
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def zeros_like_model(model) -> dict:
    """The model's variables as zeros, for tests that read names and shapes only: no
    initialiser is compiled (seconds per model on this CPU)."""
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_variables(model))


def wait_for_checkpoint(workdir: Path, step: int, proc: subprocess.Popen, log: Path | None = None,
                        timeout: float = 600) -> None:
    """Until `<workdir>/checkpoints/<step>` exists, so that a signal then lands mid-run.
    AssertionError (with the tail of `log`) if the run ends first or `timeout` passes."""
    tail = (lambda: log.read_text()[-3000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (workdir / "checkpoints" / str(step)).is_dir():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before checkpoint {step}:\n{tail()}")
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint {step} after {timeout} s:\n{tail()}")


def jit_apply(model):
    """model.apply under jit: op-by-op dispatch of a U-Net is many times slower on CPU."""
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def trained_stats(model, variables, x):
    """Variables after one training-mode forward, so batch_stats differ from their init."""
    _, updates = jit_apply(model)(variables, x, train=True, mutable=("batch_stats",))
    return {"params": variables["params"], "batch_stats": updates["batch_stats"]}


@pytest.fixture(scope="session")
def small_ynet():
    """A narrow YNet3D (width 4, 6 classes) with non-trivial running statistics."""
    model = YNet3D(num_classes=6, width=4)
    variables = trained_stats(model, init_variables(model, jax.random.key(1)), random_cubes(seed=1))
    return model, variables


# The modules whose runs take longest, longest first: pytest-xdist (`-n auto`, whole
# modules per worker) hands modules out in collection order, and one started last would
# leave the other workers idle while it runs alone. The 2-process runs are the longest
# chain (every launch compiles again in process 1: JAX writes the persistent cache from
# process 0 only, and on CPU the cache key holds each process's device assignment).
LONGEST_FIRST = ("test_multiprocess", "test_pod_resume", "test_main", "test_train", "test_finetune",
                 "test_transforms", "test_predict", "test_readme", "test_eval_padding")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.module.__name__ if item.module else "", len(rank)),
                                 order[id(item)]))
