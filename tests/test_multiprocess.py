"""Multi-process runs through the public door: `launch/local.sh 2 python -m transvw_jax.main ...`,
two processes x two simulated CPU devices on 127.0.0.1, joined by jax.distributed (gloo).

One module-wide reference run (the tiny demo end to end, pretraining 8 steps) serves every
test: the interrupted runs below must end with exactly its weights.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import cpu_env, wait_for_checkpoint
from flax.traverse_util import flatten_dict

from transvw_jax import checkpointing

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local.sh"
# The same schedule for every pretraining run here, so that all of them can be compared
# with the reference: checkpoints every 2 steps leave room to kill a run in the middle.
PRETRAIN = ["--config.train.steps=8", "--config.train.checkpoint_every=2", "--config.train.eval_every=4",
            "--config.train.log_every=2", "--config.train.sample_every=0",
            "--config.parallel.heartbeat_timeout_s=10"]


def _env(cache: Path) -> dict[str, str]:
    # The restarted processes compile the same programs: reuse them (minutes on 2 cores).
    return cpu_env(2, PYTHON=sys.executable, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache))


def _launch(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(LAUNCHER), "2", *args], cwd=ROOT, env=_env(cache),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"launcher did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
    return log.read_text()


def _pids(log: Path, timeout: float = 60) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pairs = re.findall(r"local\.sh: process (\d+) pid (\d+)", log.read_text())
        found = {int(i): int(p) for i, p in pairs}
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no process ids in the launcher's output:\n{log.read_text()}")


def _params_at(workdir: Path, step: int) -> dict[str, np.ndarray]:
    from configs import demo
    from transvw_jax.models import abstract_variables, build_model

    config = demo.get_config("runlocal")
    config.model.conv_impl = "xla3d"  # shapes only
    like = abstract_variables(build_model(config.model))
    restored = checkpointing.restore_variables(workdir, like, step=step)
    assert restored is not None, f"no checkpoint {step} in {workdir}"
    return {k: np.asarray(v) for k, v in flatten_dict(jax.device_get(restored[1]), sep="/").items()}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{len(different)} arrays differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """The tiny demo end to end in 2 processes: synthesize and discover (process 0 writes,
    process 1 waits), pretrain, export."""
    workdir = tmp_path_factory.mktemp("mp") / "demo"
    log = workdir.parent / "demo.log"
    proc = _launch(["--config", "configs/demo.py:runlocal", "--workdir", str(workdir), *PRETRAIN,
                    "--config.train.sample_every=8"], cache, log)
    out = _finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    return workdir


def test_two_processes_run_the_demo_end_to_end(reference):
    out = (reference.parent / "demo.log").read_text()
    assert "jax.distributed: process 1 of 2, 2 local / 4 global devices" in out
    for name in ("volumes", "store/manifest.json", "checkpoints/8", "best", "metrics.jsonl", "samples",
                 "export/transvw.safetensors", "pretrain_summary.json"):
        assert (reference / name).exists(), name
    # Every automatic choice was made once for the 4-device mesh and recorded.
    config = (reference / "config.json").read_text()
    assert '"auto"' not in config and '"conv_impl": "matmul"' in config
    assert '"distributed": "explicit"' in config
    assert len(re.findall(r"\[p\d\] .*resolved for 4 cpu device\(s\) in 2 process\(es\)", out)) == 2
    # Process 1 only waited for discovery: one process wrote the store.
    assert not re.search(r"\[p1\] .*discover: wrote", out)


def test_two_processes_fine_tune_from_the_pretrained_run(reference, cache, tmp_path):
    workdir = tmp_path / "ft"
    log = tmp_path / "ft.log"
    proc = _launch(["--config", "configs/demo_finetune.py:runlocal", "--workdir", str(workdir),
                    "--config.stages=('synthesize_labeled', 'finetune')",
                    f"--config.finetune.pretrained={reference}"], cache, log)
    out = _finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert (workdir / "finetune" / "finetune_summary.json").is_file()
    assert (workdir / "finetune" / "eval" / "report.json").is_file()


def test_lost_and_preempted_processes_resume_bit_identically(reference, cache, tmp_path):
    """Preempted (SIGTERM to the launcher, passed on to both): JAX's preemption service
    picks one step, both save it and exit 143. Restarted, one process SIGKILLed as soon as
    it has resumed: the other stops by itself, naming it. Restarted again: the run ends
    with the uninterrupted run's weights, bit for bit."""
    workdir = tmp_path / "resume"
    workdir.mkdir()
    shutil.copytree(reference / "store", workdir / "store")
    args = ["--config", "configs/demo.py:runlocal", "--workdir", str(workdir),
            "--config.stages=('pretrain',)", *PRETRAIN]

    # 1. Once both have saved step 2, SIGTERM the launcher. 400 steps: long enough to be
    # stopped in the middle (the schedule does not depend on the step count).
    log = tmp_path / "term.log"
    long_run = [a for a in args if a != "--config.train.steps=8"] + ["--config.train.steps=400"]
    proc = _launch(long_run, cache, log)
    wait_for_checkpoint(workdir, 2, proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    out = _finish(proc, log, timeout=300)
    assert proc.returncode == 143, out[-3000:]
    lines = [line for line in out.splitlines() if re.match(r"\[p\d\] preempted: ", line)]
    assert len(lines) == 2, out[-3000:]
    steps = {int(line.split("at step ")[1].split(" ")[0]) for line in lines}
    assert len(steps) == 1, lines  # one step for both
    stopped = steps.pop()
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == stopped
    if stopped >= 8:
        pytest.skip(f"the run was past step 8 (step {stopped}) when the signal arrived")

    # 2. Restart both; kill ONE as soon as it has resumed (before it compiles its step):
    # the other stops by itself, naming it.
    log = tmp_path / "one.log"
    proc = _launch(args, cache, log)
    pids = _pids(log)
    deadline = time.monotonic() + 300
    while not re.search(r"\[p1\] .*resumed from", log.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    out = _finish(proc, log, timeout=180)
    assert time.monotonic() - killed_at < 120, "the surviving process did not stop within 2 minutes"
    assert proc.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("[p0] error:")]
    assert len(lines) == 1, out[-3000:]
    assert "lost process 1 of 2" in lines[0]
    assert "Traceback" not in "\n".join(line for line in out.splitlines() if line.startswith("[p0]"))

    # 3. Restart both: the run ends with the weights of the uninterrupted one, bit for bit.
    log = tmp_path / "last.log"
    proc = _launch(args, cache, log)
    out = _finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    assert f"resumed from {workdir / 'checkpoints'}/{stopped}" in out
    _assert_same(_params_at(workdir, 8), _params_at(reference, 8))


def test_a_workdir_that_is_not_shared_stops_every_process_with_one_line(cache, tmp_path):
    """Two processes given different directories (as with a per-host disk): both stop
    before any work with the same line naming the directory."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "transvw_jax.main", "--config", "configs/demo.py:runlocal",
               "--workdir", str(tmp_path / f"host{i}"), "--config.stages=('pretrain',)",
               "--config.parallel.distributed=explicit",
               f"--config.parallel.coordinator_address=127.0.0.1:{port}",
               "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(cache), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err[-3000:]
        assert f"--workdir {tmp_path / f'host{i}'} is not shared by all 2 processes: process 1" in errors[0]
    assert not (tmp_path / "host1" / "checkpoints").exists()
